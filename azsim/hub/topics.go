package hub

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

type topicKind int

const (
	topicTelemetry topicKind = iota + 1
	topicTwinGet
	topicTwinReported
	topicMethodRes
	topicIssueCert
)

// deviceTopic is a PUBLISH topic a device may use, parsed.
type deviceTopic struct {
	kind   topicKind
	bag    []property // telemetry property bag, in order
	rid    string
	hasRID bool
	status int // method response status
}

// property is one property-bag entry; a key without "=" has a nil value.
type property struct {
	key   string
	value *string
}

// parseDeviceTopic accepts exactly the topics a device may publish to.
func parseDeviceTopic(deviceID, topic string) (deviceTopic, error) {
	events := "devices/" + deviceID + "/messages/events"
	if topic == events || strings.HasPrefix(topic, events+"/") {
		bag, err := parseBag(strings.TrimPrefix(strings.TrimPrefix(topic, events), "/"))
		if err != nil {
			return deviceTopic{}, fmt.Errorf("telemetry topic %q: %w", topic, err)
		}
		return deviceTopic{kind: topicTelemetry, bag: bag}, nil
	}
	path, query, _ := strings.Cut(topic, "?")
	var t deviceTopic
	switch {
	case path == "$iothub/twin/GET/":
		t.kind = topicTwinGet
	case path == "$iothub/twin/PATCH/properties/reported/":
		t.kind = topicTwinReported
	case path == "$iothub/credentials/POST/issueCertificate/":
		t.kind = topicIssueCert
	case strings.HasPrefix(path, "$iothub/methods/res/") && strings.HasSuffix(path, "/"):
		s := strings.TrimSuffix(strings.TrimPrefix(path, "$iothub/methods/res/"), "/")
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 || n > 65535 {
			return deviceTopic{}, fmt.Errorf("method response topic %q: status %q is not an integer", topic, s)
		}
		t.kind, t.status = topicMethodRes, n
	default:
		return deviceTopic{}, fmt.Errorf("topic %q is not one a device may publish to", topic)
	}
	q, err := parseBag(query)
	if err != nil {
		return deviceTopic{}, fmt.Errorf("topic %q: %w", topic, err)
	}
	for _, p := range q {
		if p.key == "$rid" && p.value != nil {
			t.rid, t.hasRID = *p.value, true
		}
	}
	return t, nil
}

// parseBag decodes k1=v1&k2&k3=, percent-encoded per RFC 3986. Like the
// real hub (.NET's Uri.UnescapeDataString), '+' is a literal plus, not a
// space: a client that encodes a space as '+' sees its plus sign arrive.
func parseBag(s string) ([]property, error) {
	var out []property
	if s == "" {
		return nil, nil
	}
	for _, kv := range strings.Split(s, "&") {
		if kv == "" {
			continue
		}
		k, v, hasV := strings.Cut(kv, "=")
		dk, err := url.PathUnescape(k)
		if err != nil {
			return nil, fmt.Errorf("property name %q is not URL-encoded correctly", k)
		}
		p := property{key: dk}
		if hasV {
			dv, err := url.PathUnescape(v)
			if err != nil {
				return nil, fmt.Errorf("value of %q is not URL-encoded correctly", dk)
			}
			p.value = &dv
		}
		out = append(out, p)
	}
	return out, nil
}

// bagEscape encodes like the hub: spaces as %20, not '+'.
func bagEscape(s string) string {
	return strings.ReplaceAll(url.QueryEscape(s), "+", "%20")
}

func encodeBag(props []property) string {
	var b strings.Builder
	for i, p := range props {
		if i > 0 {
			b.WriteByte('&')
		}
		b.WriteString(bagEscape(p.key))
		if p.value != nil {
			b.WriteByte('=')
			b.WriteString(bagEscape(*p.value))
		}
	}
	return b.String()
}

// TelemetryRecord is one line of the telemetry log.
type TelemetryRecord struct {
	DeviceID   string `json:"deviceId"`
	Topic      string `json:"topic"`
	Properties struct {
		System      map[string]any `json:"system"`
		Application map[string]any `json:"application"`
	} `json:"properties"`
	// Body is the payload: a JSON value when it is valid JSON, else a string
	// (base64 when BodyEncoding is "base64").
	Body         any       `json:"body"`
	BodyEncoding string    `json:"bodyEncoding,omitempty"`
	ReceivedAt   time.Time `json:"receivedAt"`
}

func (h *Hub) recordTelemetry(deviceID, topic string, bag []property, payload []byte, retain, will bool) {
	if h.cfg.TelemetryLog == nil {
		return
	}
	var r TelemetryRecord
	r.DeviceID, r.Topic, r.ReceivedAt = deviceID, topic, h.now().UTC()
	r.Properties.System = map[string]any{}
	r.Properties.Application = map[string]any{}
	for _, p := range bag {
		var v any
		if p.value != nil {
			v = *p.value
		}
		if strings.HasPrefix(p.key, "$.") {
			r.Properties.System[p.key] = v
		} else {
			r.Properties.Application[p.key] = v
		}
	}
	if retain {
		r.Properties.Application["mqtt-retain"] = "true"
	}
	if will {
		r.Properties.Application["iothub-MessageType"] = "Will"
	}
	var compact bytes.Buffer
	switch {
	case len(payload) > 0 && json.Compact(&compact, payload) == nil:
		r.Body = json.RawMessage(compact.Bytes())
	case utf8.Valid(payload):
		r.Body = string(payload)
	default:
		r.Body = base64.StdEncoding.EncodeToString(payload)
		r.BodyEncoding = "base64"
	}
	line, err := json.Marshal(r)
	if err != nil {
		return
	}
	line = append(line, '\n')
	h.logMu.Lock()
	defer h.logMu.Unlock()
	_, _ = h.cfg.TelemetryLog.Write(line)
	if f, ok := h.cfg.TelemetryLog.(interface{ Flush() error }); ok {
		_ = f.Flush()
	}
}
