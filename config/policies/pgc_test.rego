package acge_test

import rego.v1

import data.acge

good := {
	"method": "POST",
	"path": "/api/v1/policy/acge/compile",
	"headers": {"x-user-roles": "reader,policy-compiler"},
	"body": {"constitutional_hash": "cdd01ef066bc6cf2", "rules": [{"id": "r1"}]},
	"route": "pgc",
}

test_a_compiler_with_a_good_request_is_allowed if {
	acge.allow with input as good
}

test_a_caller_without_the_role_is_denied if {
	not acge.allow with input as object.union(good, {"headers": {"x-user-roles": "reader"}})
	"the caller lacks the policy-compiler role" in acge.reasons with input as object.union(good, {"headers": {"x-user-roles": "reader"}})
}

test_another_constitution_is_denied if {
	bad := object.union(good, {"body": {"constitutional_hash": "0000", "rules": []}})
	not acge.allow with input as bad
}

test_too_many_rules_are_denied if {
	rules := [{"id": sprintf("r%d", [i])} | some i in numbers.range(1, 201)]
	not acge.allow with input as object.union(good, {"body": {"constitutional_hash": "cdd01ef066bc6cf2", "rules": rules}})
}

test_a_low_acge_score_is_denied if {
	not acge.allow with input as object.union(good, {"acge": {"score": 0.2, "principles": ["safety"]}})
	acge.allow with input as object.union(good, {"acge": {"score": 0.9, "principles": []}})
}

test_a_token_without_rule_of_law_is_denied if {
	not acge.allow with input as object.union(good, {"jwt": {"sub": "svc", "constitutional_principles_validated": ["privacy"]}})
	acge.allow with input as object.union(good, {"jwt": {"sub": "svc", "constitutional_principles_validated": ["privacy", "rule_of_law"]}})
}
