package telemetry

import (
	"crypto/sha256"
	"encoding/hex"
	"maps"
	"strconv"
	"strings"
	"time"

	"github.com/gwagent/gwagent/telemetry/outbox"
)

// Packing ([telemetry] pack = true): IoT Hub meters its daily quota in
// chunks of 4 KB (0.5 KB on F1), and a 100-byte reading costs a whole
// chunk. So consecutive application messages with the same properties
// travel as one message whose body is the JSON array of their bodies, up
// to PackBytes as the hub meters it (body, system property values,
// application property names and values): one chunk for what would have
// cost one each.
//
// What the cloud sees of a packed message:
//   - body: [<body 1>,<body 2>,...], each body byte for byte as queued, in
//     queue order;
//   - the members' own properties (content type, encoding, application
//     properties), the same for all of them;
//   - application property PackedProperty: the number of members;
//   - application property PackedIDsProperty: the members' message ids,
//     comma-separated, in the same order: the $.mid each would have had
//     unpacked. Receivers deduplicate readings by these ids: after a crash
//     the same readings may be sent again packed differently;
//   - $.mid: "pack-" and 24 hex digits of a hash of the member ids.
//
// A message is never split: one larger than PackBytes alone travels alone,
// as does a lone message (unchanged, with its own $.mid). Only JSON
// application messages are packed (content type application/json, which
// every spool file is); health messages never are. Crash guarantees stay
// those of single messages: the members leave the outbox, and their spool
// files the spool, only after the hub acknowledged the packed message.
const (
	PackedProperty    = "gwagent-packed"
	PackedIDsProperty = "gwagent-ids"
	packIDPrefix      = "pack-"
	// packOverhead: "[" "]" around the bodies.
	packOverhead = 2
)

// DefaultPackBytes is a quota chunk on every tier but F1 (512 bytes).
const DefaultPackBytes = 4096

// packable reports whether m may travel in a pack.
func packable(m *outbox.Message) bool {
	return m.Kind == outbox.KindApp && m.System["ct"] == "application/json"
}

// packer gathers consecutive messages for one publish.
type packer struct {
	limit   int // PackBytes
	msgs    []*outbox.Message
	size    int       // metered size of the pack with msgs, its mid and properties
	firstAt time.Time // when the first member was taken (PackWait counts from here)
}

// meteredSize is a message's size as IoT Hub meters it ("Create and read
// IoT Hub messages": body, system property values, application property
// names and values).
func meteredSize(body int, system, app map[string]string) int {
	n := body
	for _, v := range system {
		n += len(v)
	}
	for k, v := range app {
		n += len(k) + len(v)
	}
	return n
}

// sizeWith is the metered size of the pack with m added.
func (p *packer) sizeWith(m *outbox.Message) int {
	if len(p.msgs) == 0 {
		sys := 0
		for k, v := range m.System {
			if k != "mid" {
				sys += len(v)
			}
		}
		return meteredSize(packOverhead+len(m.Body), nil, m.App) + sys + len(packIDPrefix) + 24 +
			len(PackedProperty) + 1 + len(PackedIDsProperty) + len(m.ID)
	}
	n := p.size + 1 + len(m.Body) + 1 + len(m.ID) // a comma in the body and one in the ids
	if c := len(p.msgs) + 1; len(strconv.Itoa(c)) > len(strconv.Itoa(c-1)) {
		n++ // the count gained a digit
	}
	return n
}

// fits reports whether m may join the pack: same properties, within the
// limit.
func (p *packer) fits(m *outbox.Message) bool {
	if len(p.msgs) > 0 {
		first := p.msgs[0]
		if !maps.Equal(first.App, m.App) || !sameSystem(first.System, m.System) {
			return false
		}
	}
	return p.sizeWith(m) <= p.limit
}

// sameSystem compares system properties other than the message id.
func sameSystem(a, b map[string]string) bool {
	n := 0
	for k, v := range a {
		if k == "mid" {
			continue
		}
		if w, ok := b[k]; !ok || w != v {
			return false
		}
		n++
	}
	for k := range b {
		if k != "mid" {
			n--
		}
	}
	return n == 0
}

func (p *packer) add(m *outbox.Message, now time.Time) {
	if len(p.msgs) == 0 {
		p.firstAt = now
	}
	p.size = p.sizeWith(m)
	p.msgs = append(p.msgs, m)
}

// take returns the members and empties the packer.
func (p *packer) take() []*outbox.Message {
	out := p.msgs
	p.msgs, p.size = nil, 0
	return out
}

// packed builds the publish for members (two or more): body, system and
// application properties.
func packed(members []*outbox.Message) (body []byte, system, app map[string]string) {
	n := packOverhead
	ids := make([]string, len(members))
	for i, m := range members {
		n += len(m.Body) + 1
		ids[i] = m.ID
	}
	body = make([]byte, 0, n)
	body = append(body, '[')
	for i, m := range members {
		if i > 0 {
			body = append(body, ',')
		}
		body = append(body, m.Body...)
	}
	body = append(body, ']')
	joined := strings.Join(ids, ",")
	sum := sha256.Sum256([]byte(joined))
	system = maps.Clone(members[0].System)
	if system == nil {
		system = map[string]string{}
	}
	system["mid"] = packIDPrefix + hex.EncodeToString(sum[:12])
	app = maps.Clone(members[0].App)
	if app == nil {
		app = map[string]string{}
	}
	app[PackedProperty] = strconv.Itoa(len(members))
	app[PackedIDsProperty] = joined
	return body, system, app
}
