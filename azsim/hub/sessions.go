package hub

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/storage"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Persistent MQTT sessions. A device that connects with CleanSession=0
// keeps its session at the hub while it is away: its subscriptions, and the
// cloud-to-device messages waiting for it or sent and not yet acknowledged.
// The real hub keeps them across its own restarts and fail-overs; the
// device never sees one. Microsoft's Python SDK relies on it: after a
// reconnect it does not subscribe again. azsim keeps these sessions in
// StateDir/sessions.json, written atomically whenever one changes (never
// for telemetry), and gives them back to the broker at start, so that a
// device reconnecting after an azsim restart gets CONNACK with session
// present, its subscriptions and its messages.
//
// sessions.json is a convenience, not the registry: a damaged file is
// moved aside and the hub starts without sessions, saying so (Warnings).

const (
	sessionsFileName = "sessions.json"
	sessionsVersion  = 1
)

type sessionsFile struct {
	Version  int                       `json:"version"`
	Sessions map[string]*storedSession `json:"sessions"`
}

// storedSession is one device's persistent session.
type storedSession struct {
	// Subscriptions: filter -> granted QoS.
	Subscriptions map[string]byte `json:"subscriptions"`
	// C2D: messages not yet acknowledged by the device, oldest first
	// (sent-but-unacknowledged ones first, then the queue).
	C2D []storedC2D `json:"c2d,omitempty"`
}

type storedC2D struct {
	Topic   string `json:"topic"`
	Payload []byte `json:"payload"`
}

// inflightC2D is a C2D message sent at QoS 1 and not yet acknowledged.
type inflightC2D struct {
	packetID uint16
	msg      c2dMessage
}

// sessionStore writes sessions.json; saveMu orders the snapshots.
type sessionStore struct {
	path   string
	saveMu sync.Mutex
	// loaded is what the file held at start, for the broker's restore.
	loaded map[string]*storedSession
}

// loadSessions reads sessions.json into the devices (h.mu not needed: New
// calls it before any traffic). Entries that do not fit the registry or
// the hub's rules are dropped one by one; a damaged file is moved aside
// whole. Each drop is a warning.
func (h *Hub) loadSessions(dir string) {
	s := &sessionStore{path: filepath.Join(dir, sessionsFileName), loaded: map[string]*storedSession{}}
	h.sessions = s
	b, err := os.ReadFile(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	var f sessionsFile
	if err == nil {
		err = json.Unmarshal(b, &f)
	}
	if err == nil && f.Version != sessionsVersion {
		err = fmt.Errorf("version %d, this azsim writes %d", f.Version, sessionsVersion)
	}
	if err != nil {
		aside := s.path + ".damaged-" + time.Now().UTC().Format("20060102T150405Z")
		if rerr := os.Rename(s.path, aside); rerr != nil {
			aside = "left in place (" + rerr.Error() + ")"
		}
		h.warnings = append(h.warnings, fmt.Sprintf("%s is damaged (%v): every persistent MQTT session (subscriptions and queued cloud-to-device messages) was dropped; devices must subscribe again; the file was moved to %s", s.path, err, aside))
		return
	}
	ids := make([]string, 0, len(f.Sessions))
	for id := range f.Sessions {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		ss := f.Sessions[id]
		d, ok := h.devices[id]
		if why := checkSession(id, ss); !ok || why != "" {
			if !ok {
				why = "the device is not registered"
			}
			h.warnings = append(h.warnings, fmt.Sprintf("%s: dropped the persistent session of %q: %s", s.path, id, why))
			continue
		}
		d.persistentSession = true
		d.subs = ss.Subscriptions
		for _, m := range ss.C2D {
			d.c2d = append(d.c2d, c2dMessage{topic: m.Topic, payload: m.Payload})
		}
		s.loaded[id] = ss
	}
}

// checkSession says what is wrong with a stored session, or "".
func checkSession(id string, ss *storedSession) string {
	if ss == nil {
		return "empty entry"
	}
	if len(ss.Subscriptions) > maxSubscriptions {
		return fmt.Sprintf("%d subscriptions, the hub allows %d", len(ss.Subscriptions), maxSubscriptions)
	}
	for f, q := range ss.Subscriptions {
		if classifyFilter(id, f) == subNone || q > 1 {
			return fmt.Sprintf("subscription %q at QoS %d is not one the hub grants", f, q)
		}
	}
	if len(ss.C2D) > maxC2DQueue {
		return fmt.Sprintf("%d cloud-to-device messages, the hub keeps %d", len(ss.C2D), maxC2DQueue)
	}
	for _, m := range ss.C2D {
		if !strings.HasPrefix(m.Topic, "devices/"+id+"/messages/devicebound/") || len(m.Payload) > maxC2DPayload {
			return fmt.Sprintf("cloud-to-device message on %q is not one the hub sends", m.Topic)
		}
	}
	return ""
}

// saveSessions writes every persistent session. It must be called without
// h.mu held.
func (h *Hub) saveSessions() error {
	if h.sessions == nil {
		return nil
	}
	h.sessions.saveMu.Lock()
	defer h.sessions.saveMu.Unlock()
	h.mu.Lock()
	f := sessionsFile{Version: sessionsVersion, Sessions: map[string]*storedSession{}}
	for id, d := range h.devices {
		if !d.persistentSession {
			continue
		}
		ss := &storedSession{Subscriptions: map[string]byte{}}
		for flt, q := range d.subs {
			ss.Subscriptions[flt] = q
		}
		for _, m := range d.c2dInflight {
			ss.C2D = append(ss.C2D, storedC2D{Topic: m.msg.topic, Payload: m.msg.payload})
		}
		for _, m := range d.c2d {
			ss.C2D = append(ss.C2D, storedC2D{Topic: m.topic, Payload: m.payload})
		}
		f.Sessions[id] = ss
	}
	b, err := json.MarshalIndent(f, "", "  ")
	h.mu.Unlock()
	if err != nil {
		return fmt.Errorf("save MQTT sessions: %w", err)
	}
	if err := writeFileAtomic(h.sessions.path, b, 0o600); err != nil {
		return fmt.Errorf("save MQTT sessions: %w (check free space and permissions of the state directory)", err)
	}
	return nil
}

// StoredClients gives the broker the persistent sessions azsim kept, so a
// device reconnecting with CleanSession=0 resumes one (CONNACK session
// present, its subscriptions).
func (k *hook) StoredClients() ([]storage.Client, error) {
	if k.h.sessions == nil {
		return nil, nil
	}
	var out []storage.Client
	for id := range k.h.sessions.loaded {
		out = append(out, storage.Client{ID: id, Listener: "iothub", ProtocolVersion: 4, Clean: false})
	}
	return out, nil
}

// StoredSubscriptions gives the broker the kept sessions' subscriptions.
func (k *hook) StoredSubscriptions() ([]storage.Subscription, error) {
	if k.h.sessions == nil {
		return nil, nil
	}
	var out []storage.Subscription
	for id, ss := range k.h.sessions.loaded {
		for f, q := range ss.Subscriptions {
			out = append(out, storage.Subscription{Client: id, Filter: f, Qos: q})
		}
	}
	return out, nil
}

// OnUnsubscribed drops filters from a persistent session.
func (k *hook) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	h := k.h
	h.mu.Lock()
	d, ok := h.devices[cl.ID]
	changed := false
	if ok && d.persistentSession {
		for _, f := range pk.Filters {
			if _, had := d.subs[f.Filter]; had {
				delete(d.subs, f.Filter)
				changed = true
			}
		}
	}
	h.mu.Unlock()
	if changed {
		_ = h.saveSessions()
	}
}
