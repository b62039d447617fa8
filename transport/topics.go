package transport

import (
	"net/url"
	"slices"
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

func c2dSub(deviceID string) string { return "devices/" + deviceID + "/messages/devicebound/#" }

// EncodeProperties renders a property bag: system properties (keys without
// the "$." prefix: mid, ct, ce, ...) then application properties, sorted for
// stable topics, each key=value percent-encoded per RFC 3986: a space is
// %20, never '+', because the hub decodes like .NET's
// Uri.UnescapeDataString, which keeps '+' as a plus.
func EncodeProperties(system, app map[string]string) string {
	return string(appendProperties(nil, system, app))
}

// telemetryTopic is the topic of a device-to-cloud message with its
// property bag, built in one buffer: it runs for every message sent.
func telemetryTopic(deviceID string, system, app map[string]string) string {
	b := make([]byte, 0, 160)
	b = append(append(append(b, "devices/"...), deviceID...), "/messages/events/"...)
	return string(appendProperties(b, system, app))
}

// appendProperties appends the property bag EncodeProperties renders to b.
// It runs for every message sent, so it builds the bag in place instead of
// joining escaped pieces.
func appendProperties(b []byte, system, app map[string]string) []byte {
	first := true
	add := func(m map[string]string, prefix string) {
		var space [8]string
		keys := space[:0]
		for k := range m {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			if !first {
				b = append(b, '&')
			}
			first = false
			b = appendBagEscaped(b, prefix)
			b = appendBagEscaped(b, k)
			b = append(b, '=')
			b = appendBagEscaped(b, m[k])
		}
	}
	add(system, "$.")
	add(app, "")
	return b
}

// appendBagEscaped appends s percent-encoded: everything but the RFC 3986
// unreserved characters (letters, digits, '-', '.', '_', '~') as %XX.
func appendBagEscaped(b []byte, s string) []byte {
	const hex = "0123456789ABCDEF"
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~' {
			b = append(b, c)
		} else {
			b = append(b, '%', hex[c>>4], hex[c&15])
		}
	}
	return b
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
