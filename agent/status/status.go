// Package status owns the agent's one status: its lifecycle State, the
// raised conditions with their reasons, and the figures `gwagent status`,
// systemd's STATUS= line, the logs, health messages and the twin read. The
// Tracker writes it to STATE_DIR/status.json (changes at once, counters at
// most once a minute, in place when the disk is full) and tells systemd the
// new STATUS= line through the function it is handed.
//
// It is one of the agent's own parts: agent/ imports it, and cmd/gwagent
// reads status.json through agent.ReadStatus. It imports only gwagent's
// leaves and the telemetry pipeline's figures (telemetry.QuotaStats); it
// times its flushes on the injected clock and logs only through the logger
// it is handed. The Tracker is safe for concurrent use: every
// goroutine of the agent raises and clears conditions through it.
package status

import (
	"encoding/json"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/condition"
	"github.com/gwagent/gwagent/internal/diskspace"
	"github.com/gwagent/gwagent/telemetry"
)

// State is where the agent's lifecycle is. One value at a time; problems
// that can coexist with a state are Conditions.
type State int

const (
	Starting State = iota
	WaitingForClock
	NotProvisioned
	Provisioning
	Connecting
	Connected
	Reconnecting
	Degraded
	Stopped
	Swapping
)

var stateNames = [...]string{"starting", "waiting-for-clock", "not-provisioned", "provisioning", "connecting", "connected", "reconnecting", "degraded", "stopped", "swapping-certificate"}

func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return "unknown"
}

// Status is the one place STATUS=, logs, `gwagent status` and the twin's
// reported state read from. It is written to STATE_DIR/status.json.
type Status struct {
	State        string                    `json:"state"`
	Conditions   map[condition.Name]string `json:"conditions,omitempty"`
	DeviceID     string                    `json:"deviceId,omitempty"`
	Hub          string                    `json:"hub,omitempty"`
	Transport    string                    `json:"transport,omitempty"` // of the last hub connection: mqtt or websocket
	CertSerial   string                    `json:"certSerial,omitempty"`
	CertNotAfter time.Time                 `json:"certNotAfter,omitzero"`
	NextRenewal  time.Time                 `json:"nextRenewal,omitzero"`
	OutboxDepth  int                       `json:"outboxDepth"`
	OutboxBytes  int64                     `json:"outboxBytes"`
	LastAckID    string                    `json:"lastAckId,omitempty"`
	LastAckAt    time.Time                 `json:"lastAckAt,omitzero"`
	// SpoolRejected counts spool files refused (moved to rejected/) since
	// the agent started.
	SpoolRejected int64 `json:"spoolRejected,omitempty"`
	// SpoolRejectedRemoved counts refused files deleted from rejected/
	// since the agent started, which keeps the newest
	// telemetry.RejectedKeep.
	SpoolRejectedRemoved int64 `json:"spoolRejectedRemoved,omitempty"`
	// OutboxDamaged counts damaged outbox records skipped at start.
	OutboxDamaged int `json:"outboxDamagedRecords,omitempty"`
	// SendRate is the drain's send rate in effect (messages per second;
	// below [telemetry] max_rate while the hub shapes or throttles); 0
	// when unpaced.
	SendRate float64 `json:"sendRate,omitempty"`
	// HubQuota is what the agent saw while the hub refused messages as it
	// does over its daily quota (condition hub-quota-exceeded).
	HubQuota  *telemetry.QuotaStats `json:"hubQuota,omitempty"`
	Version   string                `json:"version,omitempty"`
	PID       int                   `json:"pid"`
	UpdatedAt time.Time             `json:"updatedAt"`
}

// Tracker owns Status; it is the agent's condition.Sink. Changes of state
// or conditions are logged, sent to systemd and written to disk at once;
// counters (outbox depth, last ack) are written at most once per flushEvery
// to spare the flash.
type Tracker struct {
	// writeMu orders writes: each renders and stores the status whole, so
	// that two goroutines writing at once cannot leave the older rendering
	// on disk (a count one behind until the next change).
	writeMu    sync.Mutex
	mu         sync.Mutex
	st         Status
	state      State
	path       string
	log        *slog.Logger
	notify     func(line string)
	clock      clock.Clock
	started    time.Time
	lastWrite  time.Time
	flushEvery time.Duration
	// counters fills in the telemetry pipeline's counters whenever the
	// status is written (Counters).
	counters func(*Status)
	writeErr string // the last write's error, logged once
}

// New starts the status of an agent (state Starting) that writes
// stateDir/status.json and hands each new STATUS= line to notify.
func New(stateDir string, log *slog.Logger, notify func(line string), c clock.Clock, version string) *Tracker {
	return &Tracker{
		st:         Status{State: Starting.String(), Conditions: map[condition.Name]string{}, Version: version, PID: os.Getpid()},
		path:       filepath.Join(stateDir, "status.json"),
		log:        log,
		notify:     notify,
		clock:      c,
		started:    c.Now(),
		flushEvery: time.Minute,
	}
}

// Started is when the tracker (and so the agent) started.
func (t *Tracker) Started() time.Time { return t.started }

// Counters sets the function that fills in the telemetry pipeline's
// counters whenever the status is written. Call it before the tracker is
// shared.
func (t *Tracker) Counters(f func(*Status)) { t.counters = f }

// Set moves to state s.
func (t *Tracker) Set(s State) {
	t.mu.Lock()
	if t.state == s {
		t.mu.Unlock()
		return
	}
	prev := t.state
	t.state, t.st.State = s, s.String()
	t.mu.Unlock()
	t.log.Info("state", "from", prev.String(), "to", s.String())
	t.changed()
}

// State is the current state.
func (t *Tracker) State() State {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.state
}

// Raise sets condition c with a reason (replacing an older reason).
func (t *Tracker) Raise(c condition.Name, reason string) {
	t.mu.Lock()
	old, had := t.st.Conditions[c]
	t.st.Conditions[c] = reason
	t.mu.Unlock()
	if had && old == reason {
		return
	}
	t.log.Warn("condition raised", "condition", string(c), "reason", reason)
	t.changed()
}

// Clear removes condition c.
func (t *Tracker) Clear(c condition.Name) {
	t.mu.Lock()
	_, had := t.st.Conditions[c]
	delete(t.st.Conditions, c)
	t.mu.Unlock()
	if had {
		t.log.Info("condition cleared", "condition", string(c))
		t.changed()
	}
}

// Has reports whether condition c is raised.
func (t *Tracker) Has(c condition.Name) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, ok := t.st.Conditions[c]
	return ok
}

// Update changes other fields; flushed lazily unless force.
func (t *Tracker) Update(force bool, f func(*Status)) {
	t.mu.Lock()
	f(&t.st)
	due := force || t.clock.Now().Sub(t.lastWrite) >= t.flushEvery
	t.mu.Unlock()
	if due {
		t.write()
	}
}

// Snapshot returns a copy of the status.
func (t *Tracker) Snapshot() Status {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.st
	s.Conditions = maps.Clone(t.st.Conditions)
	return s
}

// Line renders the status for systemd's STATUS=.
func (s Status) Line() string {
	var b strings.Builder
	b.WriteString(s.State)
	if s.DeviceID != "" {
		b.WriteString(" as " + s.DeviceID)
	}
	if s.Hub != "" && s.State == Connected.String() {
		b.WriteString(" to " + s.Hub)
		if s.Transport != "" {
			b.WriteString(" over " + s.Transport)
		}
	}
	if len(s.Conditions) > 0 {
		names := make([]string, 0, len(s.Conditions))
		for c := range s.Conditions {
			names = append(names, string(c))
		}
		sort.Strings(names)
		b.WriteString(" [" + strings.Join(names, ", ") + "]")
	}
	return b.String()
}

func (t *Tracker) changed() {
	s := t.write()
	t.notify(s.Line())
}

func (t *Tracker) write() Status {
	t.writeMu.Lock()
	defer t.writeMu.Unlock()
	s, b := t.render(false)
	err := atomicfile.Write(t.path, b, 0o644)
	if err != nil && diskspace.NoSpace(err) {
		// No room for a new file: say so in the old one's blocks.
		s, b = t.render(true)
		err = atomicfile.OverwriteInPlace(t.path, b)
	}
	t.mu.Lock()
	repeated := err != nil && err.Error() == t.writeErr
	t.writeErr = ""
	if err != nil {
		t.writeErr = err.Error()
	}
	t.mu.Unlock()
	if err != nil && !repeated {
		// Once per problem: on a full disk every change would say it.
		t.log.Warn("cannot write status file", "err", err)
	}
	return s
}

// render stamps and encodes the status; with diskFull it raises
// condition.DiskFull first (logged here: the caller is already writing).
func (t *Tracker) render(diskFull bool) (Status, []byte) {
	t.mu.Lock()
	var raised string
	if _, had := t.st.Conditions[condition.DiskFull]; diskFull && !had {
		raised = diskspace.Reason(filepath.Dir(t.path))
		t.st.Conditions[condition.DiskFull] = raised
	}
	if t.counters != nil {
		t.counters(&t.st)
	}
	t.st.UpdatedAt = t.clock.Now().UTC()
	t.lastWrite = t.clock.Now()
	s := t.st
	s.Conditions = maps.Clone(t.st.Conditions)
	t.mu.Unlock()
	if raised != "" {
		t.log.Warn("condition raised", "condition", string(condition.DiskFull), "reason", raised)
	}
	b, _ := json.MarshalIndent(s, "", "  ")
	return s, append(b, '\n')
}

// maxStatusBytes bounds status.json for readers; the agent writes about 1 KiB.
const maxStatusBytes = 1 << 20

// Read reads the status file a running (or stopped) agent wrote.
func Read(stateDir string) (*Status, error) {
	b, err := atomicfile.ReadRegular(filepath.Join(stateDir, "status.json"), maxStatusBytes)
	if err != nil {
		return nil, err
	}
	var s Status
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, err
	}
	return &s, nil
}
