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
// the "$." prefix: mid, ct, ce, ...) then application properties, each
// key=value URL-encoded as in a query string, sorted for stable topics.
func EncodeProperties(system, app map[string]string) string {
	var parts []string
	add := func(m map[string]string, prefix string) {
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			parts = append(parts, url.QueryEscape(prefix+k)+"="+url.QueryEscape(m[k]))
		}
	}
	add(system, "$.")
	add(app, "")
	return strings.Join(parts, "&")
}

// DecodeProperties splits a property bag into system properties ("$."
// removed) and application properties. A key without '=' has an empty value.
func DecodeProperties(bag string) (system, app map[string]string) {
	system, app = map[string]string{}, map[string]string{}
	for _, kv := range strings.Split(bag, "&") {
		if kv == "" {
			continue
		}
		k, v, _ := strings.Cut(kv, "=")
		dk, err1 := url.QueryUnescape(k)
		dv, err2 := url.QueryUnescape(v)
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
