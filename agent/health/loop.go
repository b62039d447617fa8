package health

import (
	"context"
	"encoding/json"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gwagent/gwagent/agent/status"
	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/telemetry"
	"github.com/gwagent/gwagent/telemetry/outbox"
)

// Deps are what the agent hands the health loop.
type Deps struct {
	Clock   clock.Clock
	Log     *slog.Logger
	Version string
	// Status is the agent's status tracker: state, conditions, transport,
	// the certificate's end and the agent's start.
	Status interface {
		Snapshot() status.Status
		Started() time.Time
	}
	// StateDir is the state directory (its file system's space is reported).
	StateDir func() string
}

// Queue is the telemetry pipeline as the loop sees it: its counters, and
// where the message goes.
type Queue interface {
	Stats() telemetry.Stats
	Enqueue(msgs ...*outbox.Message) error
}

// Loop queues a health message every interval.
type Loop struct {
	d        Deps
	q        Queue         // Run's
	src      Source        // Run's own
	interval atomic.Int64  // ns: config or twin
	retimer  chan struct{} // wakes Run when the interval changed
	up       chan struct{} // closed at the first hub connection
	upOnce   sync.Once
}

// New prepares a loop sending every interval.
func New(interval time.Duration, d Deps) *Loop {
	l := &Loop{d: d, retimer: make(chan struct{}, 1), up: make(chan struct{})}
	l.interval.Store(int64(interval))
	return l
}

// Interval is the interval in effect.
func (l *Loop) Interval() time.Duration { return time.Duration(l.interval.Load()) }

// SetInterval changes the interval and restarts the wait for the next
// message with it.
func (l *Loop) SetInterval(d time.Duration) (old time.Duration) {
	old = time.Duration(l.interval.Swap(int64(d)))
	select {
	case l.retimer <- struct{}{}:
	default:
	}
	return old
}

// ReachedHub marks the first connection to the hub since start.
func (l *Loop) ReachedHub() { l.upOnce.Do(func() { close(l.up) }) }

// Run sends on q until ctx ends. The first message goes as soon as the hub is
// reached, so the cloud sees a (re)started gateway at once and the message
// already names the certificate and transport in use; after one interval if
// the hub stays out of reach.
func (l *Loop) Run(ctx context.Context, q Queue) {
	l.q = q
	first, firstC := l.d.Clock.NewTimer(l.Interval())
	select {
	case <-ctx.Done():
		first.Stop()
		return
	case <-l.up:
	case <-firstC:
	}
	first.Stop()
	l.send()
	for {
		t, tC := l.d.Clock.NewTimer(l.Interval())
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-l.retimer:
			t.Stop()
			continue
		case <-tC:
		}
		l.send()
	}
}

func (l *Loop) send() {
	now := l.d.Clock.Now()
	h := l.src.Read(now, l.d.StateDir())
	h.AgentUptime = now.Sub(l.d.Status.Started()).Seconds()
	h.AgentVersion = l.d.Version
	st := l.d.Status.Snapshot()
	h.AgentState = st.State
	h.Transport = st.Transport
	for c := range st.Conditions {
		h.ConditionsActive = append(h.ConditionsActive, string(c))
	}
	if !st.CertNotAfter.IsZero() {
		days := st.CertNotAfter.Sub(now).Hours() / 24
		h.CertDaysLeft = &days
	}
	ps := l.q.Stats()
	h.OutboxDepth, h.SpoolRejected, h.SpoolRejectedRemoved = ps.OutboxDepth, ps.SpoolRejected, ps.SpoolRejectedRemoved
	h.SendRate = ps.SendRate
	if !ps.Quota.Since.IsZero() {
		h.HubQuota = &ps.Quota
	}
	body, _ := json.Marshal(h)
	if err := l.q.Enqueue(&outbox.Message{Kind: outbox.KindHealth, Body: body,
		System: map[string]string{"ct": "application/json", "ce": "utf-8"},
		App:    map[string]string{"type": "health"}}); err != nil {
		l.d.Log.Warn("health message not queued", "err", err)
	}
}
