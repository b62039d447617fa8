package telemetry_test

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/condition"
	"github.com/gwagent/gwagent/telemetry"
	"github.com/gwagent/gwagent/telemetry/outbox"
	"github.com/gwagent/gwagent/transport"
)

// sink records conditions as the agent's status tracker would: it stands in
// for the agent, not for a component a user has.
type sink struct {
	mu    sync.Mutex
	conds map[condition.Name]string
}

func (s *sink) Raise(c condition.Name, reason string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.conds[c] = reason
}

func (s *sink) Clear(c condition.Name) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conds, c)
}

func (s *sink) Has(c condition.Name) bool {
	_, ok := s.reason(c)
	return ok
}

func (s *sink) reason(c condition.Name) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.conds[c]
	return r, ok
}

// rigOpts adjust a pipeline under test.
type rigOpts struct {
	clock    clock.Clock   // default clock.Real
	settle   time.Duration // default 1 s, the config's default
	stateDir string        // default a temporary directory
	spoolDir string        // default a temporary directory's spool/
	outbox   outbox.Options
	backlog  func(bool)
	inotify  func() (int, error)
	quiet    bool                     // log to the buffer only (benchmarks print every b.Log)
	sending  func() telemetry.Sending // default: unpaced, unpacked
}

// rig is one pipeline, with Run going, on temporary state and spool
// directories.
type rig struct {
	t      testing.TB
	p      *telemetry.Pipeline
	sink   *sink
	log    *testenv.Buffer
	state  string
	spool  string
	urgent atomic.Int64 // Changed(true) calls
	cancel context.CancelFunc
	done   chan struct{}
}

func newRig(t testing.TB, o rigOpts) *rig {
	t.Helper()
	if o.settle == 0 {
		o.settle = time.Second
	}
	if o.stateDir == "" {
		o.stateDir = t.TempDir()
	}
	if o.spoolDir == "" {
		o.spoolDir = filepath.Join(t.TempDir(), "spool")
	}
	r := &rig{t: t, sink: &sink{conds: map[condition.Name]string{}}, log: &testenv.Buffer{}, state: o.stateDir,
		spool: o.spoolDir, done: make(chan struct{})}
	var logTo io.Writer = io.MultiWriter(testWriter{t}, r.log)
	if o.quiet {
		logTo = r.log
	}
	p, err := telemetry.Open(telemetry.Options{
		StateDir: r.state,
		Outbox:   o.outbox,
		Spool:    func() telemetry.Spool { return telemetry.Spool{Dir: r.spool, Settle: o.settle} },
		Sink:     r.sink,
		Clock:    o.clock,
		Logger:   slog.New(slog.NewTextHandler(logTo, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Backlog:  o.backlog,
		Sending:  o.sending,
		Changed: func(urgent bool) {
			if urgent {
				r.urgent.Add(1)
			}
		},
		Inotify: o.inotify,
	})
	if err != nil {
		t.Fatal(err)
	}
	r.p = p
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() { defer close(r.done); p.Run(ctx) }()
	t.Cleanup(r.stop)
	return r
}

// stop ends Run and closes the pipeline (Drains must have ended).
func (r *rig) stop() {
	r.cancel()
	<-r.done
	r.p.Close()
}

// drain runs a Drain over pub until the returned stop is called.
func (r *rig) drain(pub telemetry.Publisher) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); r.p.Drain(ctx, pub) }()
	stop = func() { cancel(); <-done }
	r.t.Cleanup(stop)
	return stop
}

// depth is the number of messages in the outbox.
func (r *rig) depth() int { return r.p.Stats().OutboxDepth }

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// hubSession connects to azsim's hub as a new static device (a factory
// certificate): the real session the pipeline drains into.
func hubSession(t testing.TB, az *azsimtest.Azsim, deviceID string) *transport.Session {
	return az.FactorySession(t, deviceID)
}

// received returns the messages the hub got from deviceID.
func received(az *azsimtest.Azsim, deviceID string) []map[string]any {
	var out []map[string]any
	for _, m := range az.Telemetry() {
		if m["deviceId"] == deviceID {
			out = append(out, m)
		}
	}
	return out
}

// bodiesWith returns the received bodies that are JSON objects with key.
func bodiesWith(az *azsimtest.Azsim, deviceID, key string) []any {
	var out []any
	for _, m := range received(az, deviceID) {
		if b, ok := m["body"].(map[string]any); ok {
			if v, ok := b[key]; ok {
				out = append(out, v)
			}
		}
	}
	return out
}
