{{/*
acge-sidecar: named templates over the including chart's `.Values.sidecar`.
Every template takes the including chart's root context (`.`).
*/}}

{{- define "acge-sidecar.name" -}}
{{- printf "%s-acge" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "acge-sidecar.labels" -}}
app.kubernetes.io/name: acge-proxy
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The Secret holding the admin token: the user's, or the chart's own. */}}
{{- define "acge-sidecar.tokenSecret" -}}
{{- .Values.sidecar.adminToken.existingSecret | default (printf "%s-admin" (include "acge-sidecar.name" .)) -}}
{{- end -}}

{{/*
The proxy's config file: `.Values.sidecar.config` (the keys of docs/config.md), with
what the pod decides set here: the listener and admin addresses on the chart's ports,
the token file from the Secret, and the audit log and migration state on the state
volume.
*/}}
{{- define "acge-sidecar.config" -}}
{{- include "acge-sidecar.checkGrace" . -}}
{{- $s := .Values.sidecar -}}
{{- $c := deepCopy $s.config -}}
{{- $listener := merge (dict "address" (printf "0.0.0.0:%v" $s.ports.proxy)) (get $c "listener" | default dict) -}}
{{- $_ := set $listener "address" (printf "0.0.0.0:%v" $s.ports.proxy) -}}
{{- if not (semverCompare ">=1.30-0" .Capabilities.KubeVersion.Version) -}}
{{- /* No preStop sleep before 1.30: the proxy itself waits, answering /ready 503. */ -}}
{{- $_ := set $listener "drain_delay_ms" (mul $s.preStopSeconds 1000) -}}
{{- end -}}
{{- $_ := set $c "listener" $listener -}}
{{- $_ := set $c "admin" (dict "address" (printf "0.0.0.0:%v" $s.ports.admin) "token_file" "/var/run/acge/token/token") -}}
{{- $filters := get $c "filters" | default dict -}}
{{- if hasKey $filters "audit" -}}
{{- $_ := set (get $filters "audit") "dir" "/var/lib/acge/audit" -}}
{{- end -}}
{{- if hasKey $c "migration" -}}
{{- $_ := set (get $c "migration") "state_file" "/var/lib/acge/migration-state.json" -}}
{{- end -}}
{{- $inf := $s.inference | default dict -}}
{{- if $inf.endpoint -}}
{{- if not (hasKey $filters "acge") -}}
{{- fail "sidecar.inference.endpoint needs sidecar.config.filters.acge (its model directory gives the input the server's model takes)" -}}
{{- end -}}
{{- $remote := dict "endpoint" $inf.endpoint "model" $inf.model "version" ($inf.version | default "") "timeout_ms" ($inf.timeoutMs | default 250) "max_in_flight" ($inf.maxInFlight | default 4) "fallback" ($inf.fallback | default "none") -}}
{{- if $inf.inputs -}}{{- $_ := set $remote "inputs" $inf.inputs -}}{{- end -}}
{{- if $inf.output -}}{{- $_ := set $remote "output" $inf.output -}}{{- end -}}
{{- $_ := set (get $filters "acge") "remote" $remote -}}
{{- end -}}
{{- toYaml $c -}}
{{- end -}}

{{/*
The pod's grace period must cover the whole drain: the preStop sleep (or, before 1.30,
the proxy's own drain delay of the same length), any drain_delay_ms the config sets,
and drain_timeout_ms for the exchanges in flight. Shorter, and the kubelet would kill
the proxy mid-drain, cutting requests; the chart refuses to render.
*/}}
{{- define "acge-sidecar.checkGrace" -}}
{{- $s := .Values.sidecar -}}
{{- $listener := get $s.config "listener" | default dict -}}
{{- $timeout := get $listener "drain_timeout_ms" | default 10000 | int -}}
{{- $delay := get $listener "drain_delay_ms" | default 0 | int -}}
{{- $need := add $s.preStopSeconds (div (add $timeout $delay 999) 1000) 1 -}}
{{- if lt (int $s.terminationGracePeriodSeconds) (int $need) -}}
{{- fail (printf "sidecar.terminationGracePeriodSeconds is %v, below the drain it must cover: preStopSeconds %v + drain_delay_ms %v + drain_timeout_ms %v, plus 1 s = %v s (docs/operations.md)" $s.terminationGracePeriodSeconds $s.preStopSeconds $delay $timeout $need) -}}
{{- end -}}
{{- end -}}

{{- define "acge-sidecar.containerSpec" -}}
{{- $s := .Values.sidecar -}}
name: acge-proxy
image: {{ printf "%s:%s" $s.image.repository ($s.image.tag | toString) | quote }}
imagePullPolicy: {{ $s.image.pullPolicy }}
args: ["run", "--config", "/etc/acge/config.yaml"]
ports:
  - {name: acge-proxy, containerPort: {{ $s.ports.proxy }}, protocol: TCP}
  - {name: acge-admin, containerPort: {{ $s.ports.admin }}, protocol: TCP}
startupProbe:
  httpGet: {path: /live, port: acge-admin}
  periodSeconds: 2
  failureThreshold: {{ div $s.startupSeconds 2 }}
livenessProbe:
  httpGet: {path: /live, port: acge-admin}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /ready, port: acge-admin}
  periodSeconds: 5
  failureThreshold: 2
{{- if semverCompare ">=1.30-0" .Capabilities.KubeVersion.Version }}
lifecycle:
  # The endpoints controller needs a moment to stop sending traffic here; the drain
  # itself (drain_timeout_ms) starts on SIGTERM, after this.
  preStop:
    sleep: {seconds: {{ $s.preStopSeconds }}}
{{- end }}
resources:
  {{- toYaml $s.resources | nindent 2 }}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  readOnlyRootFilesystem: true
  allowPrivilegeEscalation: false
  capabilities: {drop: [ALL]}
  seccompProfile: {type: RuntimeDefault}
volumeMounts:
  - {name: acge-config, mountPath: /etc/acge, readOnly: true}
  - {name: acge-token, mountPath: /var/run/acge/token, readOnly: true}
  - {name: acge-state, mountPath: /var/lib/acge}
{{- end -}}

{{/* The sidecar as a container: `containers:` of the pod spec, one list item. */}}
{{- define "acge-sidecar.container" -}}
- {{ include "acge-sidecar.containerSpec" . | nindent 2 | trim }}
{{- end -}}

{{/*
The sidecar as a Kubernetes native sidecar (≥ 1.29): an init container that keeps
running (restartPolicy Always), started before the app and stopped after it.
*/}}
{{- define "acge-sidecar.initContainer" -}}
- {{ include "acge-sidecar.containerSpec" . | nindent 2 | trim }}
  restartPolicy: Always
{{- end -}}

{{/* `volumes:` of the pod spec: the config, the token, the writable state. */}}
{{- define "acge-sidecar.volumes" -}}
- name: acge-config
  configMap: {name: {{ include "acge-sidecar.name" . }}}
- name: acge-token
  secret: {secretName: {{ include "acge-sidecar.tokenSecret" . }}, defaultMode: 0444}
- name: acge-state
{{- if eq .Values.sidecar.state.kind "pvc" }}
  persistentVolumeClaim: {claimName: {{ .Values.sidecar.state.claimName | default (include "acge-sidecar.name" .) }}}
{{- else }}
  emptyDir: {sizeLimit: {{ .Values.sidecar.state.size }}}
{{- end }}
{{- end -}}

{{/*
Pod annotations: a checksum of the sections of the config that a reload cannot change
(listener, admin, migration, filters.audit; docs/operations.md), so that a change to
one of them rolls the pods, while a change to routes, clusters or the other filters
reaches the running proxies through the ConfigMap's in-place update and a reload.
*/}}
{{- define "acge-sidecar.podAnnotations" -}}
{{- $c := include "acge-sidecar.config" . | fromYaml -}}
{{- $fixed := dict "listener" (get $c "listener") "admin" (get $c "admin") "migration" (get $c "migration") "audit" (get (get $c "filters" | default dict) "audit") -}}
checksum/acge-restart-config: {{ toJson $fixed | sha256sum }}
{{- end -}}
