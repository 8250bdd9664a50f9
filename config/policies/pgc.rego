# The policy the seed's pgc (policy compiler) emits for its own compile endpoint,
# evaluated in process by the proxy's `policy` filter (docs/filters.md). A request is
# allowed when nothing denies it; every deny rule names its reason.
package acge

import rego.v1

default allow := false

allow if count(reasons) == 0

# Only service accounts with the compiler role may compile policies.
reasons contains "the caller lacks the policy-compiler role" if {
	not "policy-compiler" in split(object.get(input.headers, "x-user-roles", ""), ",")
}

# A compile request names the constitution it compiles against, and it is ours.
reasons contains sprintf("the request compiles against constitution %v, not cdd01ef066bc6cf2", [input.body.constitutional_hash]) if {
	input.method == "POST"
	input.body.constitutional_hash != "cdd01ef066bc6cf2"
}

reasons contains "a compile request needs a JSON body with `rules`" if {
	input.method == "POST"
	not is_array(input.body.rules)
}

# At most 200 rules per compile: larger sets go through review.
reasons contains sprintf("%d rules is over the 200 a compile may hold", [count(input.body.rules)]) if {
	is_array(input.body.rules)
	count(input.body.rules) > 200
}

# When the ACGE model scored the request, a low score is refused here too.
reasons contains sprintf("the ACGE compliance score %v is below 0.5", [input.acge.score]) if {
	input.acge.score < 0.5
}

# When a token was verified, its validated principles must include the rule of law.
reasons contains "the caller's token does not validate the rule-of-law principle" if {
	input.jwt
	not "rule_of_law" in object.get(input.jwt, "constitutional_principles_validated", [])
}
