{{/* The objects the sidecar needs, each a whole manifest. */}}

{{- define "acge-sidecar.configMap" -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "acge-sidecar.name" . }}
  labels: {{- include "acge-sidecar.labels" . | nindent 4 }}
data:
  config.yaml: |
    {{- include "acge-sidecar.config" . | nindent 4 }}
{{- end -}}

{{/* The admin token, only when the user names no existing Secret. */}}
{{- define "acge-sidecar.secret" -}}
{{- if not .Values.sidecar.adminToken.existingSecret }}
apiVersion: v1
kind: Secret
metadata:
  name: {{ include "acge-sidecar.tokenSecret" . }}
  labels: {{- include "acge-sidecar.labels" . | nindent 4 }}
type: Opaque
data:
  {{- $old := lookup "v1" "Secret" .Release.Namespace (include "acge-sidecar.tokenSecret" .) }}
  {{- if $old }}
  token: {{ index $old.data "token" }}
  {{- else }}
  token: {{ .Values.sidecar.adminToken.value | default (randAlphaNum 40) | b64enc }}
  {{- end }}
{{- end }}
{{- end -}}

{{/*
The Service clients call: its targetPort is the proxy's port, so traffic reaches the
legacy container through the sidecar with no iptables and no NET_ADMIN.
*/}}
{{- define "acge-sidecar.service" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ .Values.service.name | default .Release.Name }}
  labels: {{- include "acge-sidecar.labels" . | nindent 4 }}
spec:
  type: {{ .Values.service.type }}
  selector: {{- toYaml .Values.service.selector | nindent 4 }}
  ports:
    - {name: http, port: {{ .Values.service.port }}, targetPort: acge-proxy, protocol: TCP}
    - {name: acge-admin, port: {{ .Values.sidecar.ports.admin }}, targetPort: acge-admin, protocol: TCP}
{{- end -}}

{{- define "acge-sidecar.prometheusRule" -}}
{{- if .Values.monitoring.rules }}
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: {{ include "acge-sidecar.name" . }}
  labels: {{- include "acge-sidecar.labels" . | nindent 4 }}
spec:
  {{- $rules := .Files.Get "files/alerts.yaml" | fromYaml }}
  {{- $text := toYaml $rules.groups | replace "< 1000" (printf "< %v" .Values.monitoring.targetRps) | replace "docs/runbooks.md#" .Values.monitoring.runbookBase }}
  groups:
    {{- $text | nindent 4 }}
{{- end }}
{{- end -}}

{{/* The Grafana dashboard, for Grafana's sidecar that loads labelled ConfigMaps. */}}
{{- define "acge-sidecar.dashboard" -}}
{{- if .Values.monitoring.dashboard }}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "acge-sidecar.name" . }}-dashboard
  labels:
    {{- include "acge-sidecar.labels" . | nindent 4 }}
    grafana_dashboard: "1"
data:
  acge-proxy.json: |
    {{- .Files.Get "files/dashboard.json" | nindent 4 }}
{{- end }}
{{- end -}}

{{- define "acge-sidecar.podMonitor" -}}
{{- if eq .Values.monitoring.scrape "podMonitor" }}
apiVersion: monitoring.coreos.com/v1
kind: PodMonitor
metadata:
  name: {{ include "acge-sidecar.name" . }}
  labels: {{- include "acge-sidecar.labels" . | nindent 4 }}
spec:
  selector:
    matchLabels: {{- toYaml .Values.service.selector | nindent 6 }}
  podMetricsEndpoints:
    - {port: acge-admin, path: /metrics, interval: {{ .Values.monitoring.interval }}}
{{- else if eq .Values.monitoring.scrape "serviceMonitor" }}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "acge-sidecar.name" . }}
  labels: {{- include "acge-sidecar.labels" . | nindent 4 }}
spec:
  selector:
    matchLabels: {{- include "acge-sidecar.labels" . | nindent 6 }}
  endpoints:
    - {port: acge-admin, path: /metrics, interval: {{ .Values.monitoring.interval }}}
{{- end }}
{{- end -}}
