package agent

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
	"github.com/gwagent/gwagent/internal/condition"
	"github.com/gwagent/gwagent/internal/diskspace"
	"github.com/gwagent/gwagent/telemetry"
)

// State is where the agent's lifecycle is. One value at a time; problems
// that can coexist with a state are Conditions.
type State int

const (
	StateStarting State = iota
	StateWaitingForClock
	StateNotProvisioned
	StateProvisioning
	StateConnecting
	StateConnected
	StateReconnecting
	StateDegraded
	StateStopped
	StateSwapping
)

var stateNames = [...]string{"starting", "waiting-for-clock", "not-provisioned", "provisioning", "connecting", "connected", "reconnecting", "degraded", "stopped", "swapping-certificate"}

func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return "unknown"
}

// Condition is a named health problem (tailscale's Warnable idea): set with
// a reason, cleared when it is over.
type Condition = condition.Name

const (
	CondClockNotSynced      Condition = "clock-not-synchronised"
	CondOnboardingRejected  Condition = "onboarding-credential-rejected"
	CondKeyStoreUnavailable Condition = "key-store-unavailable"
	CondCertificateExpired  Condition = "certificate-expired"
	CondHubUnreachable      Condition = "hub-unreachable"
	CondProvisioningFailed  Condition = "provisioning-failed"
	CondOutboxFull          Condition = telemetry.CondOutboxFull
)

// Status is the one place STATUS=, logs, `gwagent status` and the twin's
// reported state read from. It is written to STATE_DIR/status.json.
type Status struct {
	State        string               `json:"state"`
	Conditions   map[Condition]string `json:"conditions,omitempty"`
	DeviceID     string               `json:"deviceId,omitempty"`
	Hub          string               `json:"hub,omitempty"`
	Transport    string               `json:"transport,omitempty"` // of the last hub connection: mqtt or websocket
	CertSerial   string               `json:"certSerial,omitempty"`
	CertNotAfter time.Time            `json:"certNotAfter,omitzero"`
	NextRenewal  time.Time            `json:"nextRenewal,omitzero"`
	OutboxDepth  int                  `json:"outboxDepth"`
	OutboxBytes  int64                `json:"outboxBytes"`
	LastAckID    string               `json:"lastAckId,omitempty"`
	LastAckAt    time.Time            `json:"lastAckAt,omitzero"`
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

// statusTracker owns Status. Changes of state or conditions are logged,
// sent to systemd and written to disk at once; counters (outbox depth,
// last ack) are written at most once per flushEvery to spare the flash.
type statusTracker struct {
	// writeMu orders writes: each renders and stores the status whole, so
	// that two goroutines writing at once cannot leave the older rendering
	// on disk (a count one behind until the next change).
	writeMu    sync.Mutex
	mu         sync.Mutex
	st         Status
	state      State
	path       string
	log        *slog.Logger
	notify     *notifier
	now        func() time.Time
	lastWrite  time.Time
	flushEvery time.Duration
	onChange   func(Status)
	// counters fills in the telemetry pipeline's counters whenever the
	// status is written (set by Run before anything else runs).
	counters func(*Status)
	writeErr string // the last write's error, logged once
}

func newStatusTracker(stateDir string, log *slog.Logger, n *notifier, now func() time.Time, version string) *statusTracker {
	return &statusTracker{
		st:         Status{State: StateStarting.String(), Conditions: map[Condition]string{}, Version: version, PID: os.Getpid()},
		path:       filepath.Join(stateDir, "status.json"),
		log:        log,
		notify:     n,
		now:        now,
		flushEvery: time.Minute,
	}
}

// Set moves to state s.
func (t *statusTracker) Set(s State) {
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
func (t *statusTracker) State() State {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.state
}

// Raise sets condition c with a reason (replacing an older reason).
func (t *statusTracker) Raise(c Condition, reason string) {
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
func (t *statusTracker) Clear(c Condition) {
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
func (t *statusTracker) Has(c Condition) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, ok := t.st.Conditions[c]
	return ok
}

// Update changes other fields; flushed lazily unless force.
func (t *statusTracker) Update(force bool, f func(*Status)) {
	t.mu.Lock()
	f(&t.st)
	due := force || t.now().Sub(t.lastWrite) >= t.flushEvery
	t.mu.Unlock()
	if due {
		t.write()
	}
}

// Snapshot returns a copy of the status.
func (t *statusTracker) Snapshot() Status {
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
	if s.Hub != "" && s.State == StateConnected.String() {
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

func (t *statusTracker) changed() {
	s := t.write()
	t.notify.status(s.Line())
	if t.onChange != nil {
		t.onChange(s)
	}
}

func (t *statusTracker) write() Status {
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
// CondDiskFull first (logged here: the caller is already writing).
func (t *statusTracker) render(diskFull bool) (Status, []byte) {
	t.mu.Lock()
	var raised string
	if _, had := t.st.Conditions[CondDiskFull]; diskFull && !had {
		raised = diskspace.Reason(filepath.Dir(t.path))
		t.st.Conditions[CondDiskFull] = raised
	}
	if t.counters != nil {
		t.counters(&t.st)
	}
	t.st.UpdatedAt = t.now().UTC()
	t.lastWrite = t.now()
	s := t.st
	s.Conditions = maps.Clone(t.st.Conditions)
	t.mu.Unlock()
	if raised != "" {
		t.log.Warn("condition raised", "condition", string(CondDiskFull), "reason", raised)
	}
	b, _ := json.MarshalIndent(s, "", "  ")
	return s, append(b, '\n')
}

// maxStatusBytes bounds status.json for readers; the agent writes about 1 KiB.
const maxStatusBytes = 1 << 20

// ReadStatus reads the status file a running (or stopped) agent wrote.
func ReadStatus(stateDir string) (*Status, error) {
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
