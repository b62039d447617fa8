package transport

import (
	"net/url"
	"sort"
	"strconv"
	"strings"
)

// IoT Hub device topics (azure-protocol §4).
const (
	twinResSub        = "$iothub/twin/res/#"
	twinDesiredSub    = "$iothub/twin/PATCH/properties/desired/#"
	methodsSub        = "$iothub/methods/POST/#"
	credentialsResSub = "$iothub/credentials/res/#"

	twinGetTopic     = "$iothub/twin/GET/?$rid="
	twinPatchTopic   = "$iothub/twin/PATCH/properties/reported/?$rid="
	twinResPrefix    = "$iothub/twin/res/"
	desiredPrefix    = "$iothub/twin/PATCH/properties/desired/"
	methodPrefix     = "$iothub/methods/POST/"
	methodResTopic   = "$iothub/methods/res/"
	credentialsTopic = "$iothub/credentials/POST/issueCertificate/?$rid="
	credentialsRes   = "$iothub/credentials/res/"
)

func telemetryTopic(deviceID string) string { return "devices/" + deviceID + "/messages/events/" }
func c2dSub(deviceID string) string         { return "devices/" + deviceID + "/messages/devicebound/#" }

// EncodeProperties renders a property bag: system properties (keys without
// the "$." prefix: mid, ct, ce, ...) then application properties, sorted for
// stable topics, each key=value percent-encoded per RFC 3986: a space is
// %20, never '+', because the hub decodes like .NET's
// Uri.UnescapeDataString, which keeps '+' as a plus.
func EncodeProperties(system, app map[string]string) string {
	var parts []string
	add := func(m map[string]string, prefix string) {
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			parts = append(parts, bagEscape(prefix+k)+"="+bagEscape(m[k]))
		}
	}
	add(system, "$.")
	add(app, "")
	return strings.Join(parts, "&")
}

// bagEscape percent-encodes everything but RFC 3986 unreserved characters.
// url.QueryEscape leaves only those and turns a space into '+'; a literal
// '+' is already %2B, so every '+' it returns was a space.
func bagEscape(s string) string {
	return strings.ReplaceAll(url.QueryEscape(s), "+", "%20")
}

// DecodeProperties splits a property bag into system properties ("$."
// removed) and application properties. A key without '=' has an empty value.
// Percent-escapes are decoded per RFC 3986: '+' stays a plus.
func DecodeProperties(bag string) (system, app map[string]string) {
	system, app = map[string]string{}, map[string]string{}
	for _, kv := range strings.Split(bag, "&") {
		if kv == "" {
			continue
		}
		k, v, _ := strings.Cut(kv, "=")
		dk, err1 := url.PathUnescape(k)
		dv, err2 := url.PathUnescape(v)
		if err1 != nil || err2 != nil {
			continue
		}
		if s, ok := strings.CutPrefix(dk, "$."); ok {
			system[s] = dv
		} else {
			app[dk] = dv
		}
	}
	return system, app
}

// parseStatusTopic parses "{prefix}{status}/?{query}" and returns the
// status and query values ($rid, $version, ...).
func parseStatusTopic(topic, prefix string) (status int, q url.Values, ok bool) {
	rest, found := strings.CutPrefix(topic, prefix)
	if !found {
		return 0, nil, false
	}
	st, query, found := strings.Cut(rest, "/?")
	if !found {
		return 0, nil, false
	}
	n, err := strconv.Atoi(st)
	if err != nil {
		return 0, nil, false
	}
	q, err = url.ParseQuery(query)
	if err != nil {
		return 0, nil, false
	}
	return n, q, true
}
