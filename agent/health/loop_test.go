package health

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/gwagent/gwagent/agent/status"
	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/condition"
	"github.com/gwagent/gwagent/telemetry"
	"github.com/gwagent/gwagent/telemetry/outbox"
)

// queue is the pipeline as the loop sees it, recording what it was given.
type queue struct {
	mu   sync.Mutex
	msgs []*outbox.Message
}

func (q *queue) Stats() telemetry.Stats { return telemetry.Stats{OutboxDepth: 3, SpoolRejected: 2} }

func (q *queue) Enqueue(msgs ...*outbox.Message) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.msgs = append(q.msgs, msgs...)
	return nil
}

func (q *queue) count() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.msgs)
}

// agentStatus is the status tracker as the loop sees it.
type agentStatus struct {
	st      status.Status
	started time.Time
}

func (s agentStatus) Snapshot() status.Status { return s.st }
func (s agentStatus) Started() time.Time      { return s.started }

// The loop runs on the clock it is handed: the first message as soon as the
// hub is reached, then one every interval, and a new interval (the twin's)
// restarts the wait. Each message carries the agent's side of the story.
func TestLoopOnTheClock(t *testing.T) {
	start := time.Date(2026, 12, 6, 0, 0, 0, 0, time.UTC)
	c := clock.NewFake(start)
	st := agentStatus{started: start.Add(-time.Minute), st: status.Status{State: "connected", Transport: "mqtt",
		Conditions: map[condition.Name]string{"throttled": "x"}, CertNotAfter: start.Add(48 * time.Hour)}}
	l := New(time.Hour, Deps{Clock: c, Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Version: "v9",
		Status: st, StateDir: t.TempDir})
	q := &queue{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); l.Run(ctx, q) }()
	defer func() { cancel(); <-done }()

	// armed waits until the loop's one timer is due in d.
	armed := func(d time.Duration) {
		t.Helper()
		for i := 0; i < 5000; i++ {
			if next, ok := c.Next(); ok && c.Pending() == 1 && next.Sub(c.Now()) == d {
				return
			}
			time.Sleep(time.Millisecond)
		}
		t.Fatalf("the loop armed no timer for %v", d)
	}
	sent := func(n int) {
		t.Helper()
		for i := 0; i < 500 && q.count() < n; i++ {
			time.Sleep(time.Millisecond)
		}
		if got := q.count(); got != n {
			t.Fatalf("%d health messages, want %d", got, n)
		}
	}
	armed(time.Hour)
	c.Advance(59 * time.Minute)
	sent(0)
	l.ReachedHub()
	sent(1)
	armed(time.Hour)
	c.Advance(time.Hour)
	sent(2)
	armed(time.Hour)
	if old := l.SetInterval(10 * time.Second); old != time.Hour {
		t.Fatalf("SetInterval returned %v, want the old hour", old)
	}
	armed(10 * time.Second)
	c.Advance(10 * time.Second)
	sent(3)

	var h Health
	if err := json.Unmarshal(q.msgs[2].Body, &h); err != nil {
		t.Fatal(err)
	}
	if h.AgentState != "connected" || h.Transport != "mqtt" || h.AgentVersion != "v9" || h.OutboxDepth != 3 || h.SpoolRejected != 2 ||
		len(h.ConditionsActive) != 1 || h.CertDaysLeft == nil || *h.CertDaysLeft > 2 || h.AgentUptime < 3600 || !h.Time.After(start) {
		t.Fatalf("health message %+v", h)
	}
	if q.msgs[2].App["type"] != "health" || q.msgs[2].Kind != outbox.KindHealth {
		t.Fatalf("message properties %+v", q.msgs[2])
	}
}
