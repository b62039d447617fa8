package twin

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/gwagent/gwagent/agent/health"
	"github.com/gwagent/gwagent/agent/status"
	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/condition"
	"github.com/gwagent/gwagent/internal/retry"
	"github.com/gwagent/gwagent/provisioning"
	"github.com/gwagent/gwagent/transport"
)

// newTwin is a twin with the agent's real parts around it: the health
// loop's interval and the status tracker (writing to a temporary
// directory).
func newTwin(t *testing.T, c clock.Clock) (*Twin, *health.Loop, *status.Tracker) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	iv := health.New(time.Hour, health.Deps{})
	st := status.New(t.TempDir(), log, func(string) {}, c, "test")
	return New(Deps{Clock: c, Log: log, Interval: iv, Status: st,
		Backoff: retry.Policy{Min: time.Second, Max: 4 * time.Second}}), iv, st
}

// The MQTT client runs each desired-properties notification on a
// goroutine of its own, so two updates sent in order may be applied in
// either order (and the sync's full read may come after a newer
// notification). Here they are fed in the bad order directly, as the race
// would: an older version never undoes a newer one.
func TestDesiredAppliedInVersionOrder(t *testing.T) {
	tw, ivs, _ := newTwin(t, clock.Real{})
	iv := ivs.Interval

	tw.OnDesired(json.RawMessage(`{"telemetryInterval":9,"$version":3}`), 3)
	tw.OnDesired(json.RawMessage(`{"telemetryInterval":7,"$version":2}`), 2)
	if iv() != 9*time.Second {
		t.Fatalf("interval %v after versions 3 (9 s) then 2 (7 s) arrived; want 9s", iv())
	}
	// The full document read before version 3 arrives late too.
	if tw.apply(json.RawMessage(`{"telemetryInterval":7,"$version":2}`), 2) || iv() != 9*time.Second {
		t.Fatalf("an older full read was applied: interval %v", iv())
	}
	// A newer patch of another property, then a late older one that sets
	// the interval: the interval was not touched since, so it applies.
	tw.OnDesired(json.RawMessage(`{"other":1,"$version":5}`), 5)
	tw.OnDesired(json.RawMessage(`{"telemetryInterval":4,"$version":4}`), 4)
	if iv() != 4*time.Second {
		t.Fatalf("interval %v; want 4s from version 4 (version 5 did not set it)", iv())
	}
	if tw.latest != 5 {
		t.Fatalf("latest desired version %d, want 5 (reported as av)", tw.latest)
	}
	tw.OnDesired(json.RawMessage(`{"telemetryInterval":11,"$version":6}`), 6)
	if iv() != 11*time.Second {
		t.Fatalf("interval %v; want 11s from version 6", iv())
	}
}

// session is a hub whose reported PATCHes wait for the test's go-ahead (a
// slow hub) or fail as the test says.
type session struct {
	mu      sync.Mutex
	reports []map[string]any
	fail    []error         // answers of the next reports, in order
	hold    chan struct{}   // if set, each report waits for a value
	sent    chan struct{}   // told of each report sent
	desired json.RawMessage // what GetTwin returns
}

func (s *session) GetTwin(ctx context.Context) (*transport.Twin, error) {
	return &transport.Twin{Desired: s.desired}, nil
}

func (s *session) PatchReported(ctx context.Context, patch any) (int64, error) {
	p := patch.(map[string]any)
	s.mu.Lock()
	s.reports = append(s.reports, p)
	var err error
	if len(s.fail) > 0 {
		err, s.fail = s.fail[0], s.fail[1:]
	}
	hold := s.hold
	s.mu.Unlock()
	s.sent <- struct{}{}
	if _, ok := p["telemetryInterval"]; ok && hold != nil {
		select {
		case <-hold:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	return 1, err
}

// intervalReports are the telemetryInterval reports sent, as value/av.
func (s *session) intervalReports() [][2]float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out [][2]float64
	for _, p := range s.reports {
		if ti, ok := p["telemetryInterval"].(map[string]any); ok {
			out = append(out, [2]float64{ti["value"].(float64), float64(ti["av"].(int64))})
		}
	}
	return out
}

func waitSent(t *testing.T, s *session) {
	t.Helper()
	select {
	case <-s.sent:
	case <-time.After(5 * time.Second):
		t.Fatal("no report sent")
	}
}

// serve runs tw.Serve on a session until the test ends, and waits for the
// sync's two reports (agent and certificate, the interval in effect).
func serve(t *testing.T, tw *Twin) *session {
	s := &session{sent: make(chan struct{}, 16), desired: json.RawMessage(`{"$version":1}`)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); tw.Serve(ctx, s, &provisioning.Identity{}) }()
	t.Cleanup(func() { cancel(); <-done })
	waitSent(t, s)
	waitSent(t, s)
	return s
}

// Serve owns the reports: updates arriving while a report waits for its
// answer are applied at once (OnDesired returns without waiting) and go out
// together in one next report carrying the newest state; nothing is
// reported twice.
func TestReportsOneAtATimeNewestLast(t *testing.T) {
	c := clock.NewFake(time.Date(2026, 12, 6, 0, 0, 0, 0, time.UTC))
	tw, iv, _ := newTwin(t, c)
	s := serve(t, tw)
	s.mu.Lock()
	s.hold = make(chan struct{})
	s.mu.Unlock()

	tw.OnDesired(json.RawMessage(`{"telemetryInterval":2}`), 2)
	waitSent(t, s) // held
	for v := int64(3); v <= 9; v++ {
		returned := make(chan struct{})
		go func() {
			tw.OnDesired(json.RawMessage(`{"telemetryInterval":`+string(rune('0'+v))+`}`), v)
			close(returned)
		}()
		select {
		case <-returned:
		case <-time.After(5 * time.Second):
			t.Fatal("OnDesired blocked while a report waited for its answer")
		}
	}
	if iv.Interval() != 9*time.Second {
		t.Fatalf("interval %v, want the newest update's 9s applied at once", iv.Interval())
	}
	s.hold <- struct{}{}
	waitSent(t, s)
	s.hold <- struct{}{}
	tw.OnDesired(json.RawMessage(`{"other":true}`), 9) // nothing new to report
	select {
	case <-s.sent:
		t.Fatal("a report repeated what the last one said")
	case <-time.After(100 * time.Millisecond):
	}
	want := [][2]float64{{3600, 1}, {2, 2}, {9, 9}}
	if got := s.intervalReports(); len(got) != len(want) || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Fatalf("interval reports %v, want %v", got, want)
	}
}

// A report the hub refuses is retried on the clock (the backoff, or the
// hub's retry-after), with the state in effect by then; a 429 raises the
// throttled condition until the report goes through.
func TestReportRetried(t *testing.T) {
	c := clock.NewFake(time.Date(2026, 12, 6, 0, 0, 0, 0, time.UTC))
	tw, _, st := newTwin(t, c)
	s := serve(t, tw)

	s.mu.Lock()
	s.fail = []error{&transport.StatusError{Status: 429, After: 10 * time.Second}}
	s.mu.Unlock()
	tw.OnDesired(json.RawMessage(`{"telemetryInterval":5}`), 2)
	waitSent(t, s) // refused
	bctx, bcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer bcancel()
	if err := c.BlockUntil(bctx, 1); err != nil {
		t.Fatal("no retry planned")
	}
	if !st.Has(condition.Throttled) {
		t.Fatal("a 429 did not raise the throttled condition")
	}
	tw.OnDesired(json.RawMessage(`{"telemetryInterval":6}`), 3)
	c.Advance(9 * time.Second)
	select {
	case <-s.sent:
		t.Fatal("retried before the hub's retry-after")
	case <-time.After(50 * time.Millisecond):
	}
	c.Advance(time.Second)
	waitSent(t, s)
	for i := 0; i < 500 && st.Has(condition.Throttled); i++ {
		time.Sleep(time.Millisecond)
	}
	if st.Has(condition.Throttled) {
		t.Fatal("the throttled condition stayed after the report went through")
	}
	if got := s.intervalReports(); got[len(got)-1] != [2]float64{6, 3} {
		t.Fatalf("the retry reported %v, want the state in effect by then (6 s, av 3)", got[len(got)-1])
	}
}
