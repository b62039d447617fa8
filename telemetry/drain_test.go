package telemetry_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/azsimtest"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/telemetry/outbox"
)

// Options.Backlog (which raises the Go runtime's GC target in cmd/gwagent)
// is told when the drain starts on a backlog and when the outbox is empty
// again, so the agent does not keep the larger heap while idle.
func TestBacklogSignalled(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	var mu sync.Mutex
	var calls []bool
	spool := filepath.Join(t.TempDir(), "spool")
	if err := os.MkdirAll(spool, 0o770); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 200; i++ {
		testenv.SpoolPut(t, spool, fmt.Sprintf("b%03d.json", i), []byte(fmt.Sprintf(`{"backlog":%d}`, i)))
	}
	r := newRig(t, rigOpts{spoolDir: spool, backlog: func(b bool) { mu.Lock(); calls = append(calls, b); mu.Unlock() }})
	// No hub until all 200 are queued, so the drain meets a backlog.
	testenv.Eventually(t, 30*time.Second, "200 queued", func() bool { return r.depth() >= 200 })
	r.drain(hubSession(t, az, "gw-backlog"))
	testenv.Eventually(t, 60*time.Second, "all delivered, backlog over", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(bodiesWith(az, "gw-backlog", "backlog")) == 200 && len(calls) >= 2 && !calls[len(calls)-1]
	})
	mu.Lock()
	defer mu.Unlock()
	if !calls[0] {
		t.Fatalf("Backlog calls %v: want true first", calls)
	}
	for i := 1; i < len(calls); i++ {
		if calls[i] == calls[i-1] {
			t.Fatalf("Backlog calls %v: each must change the state", calls)
		}
	}
}

// fakeHub is a Publisher whose PUBACKs the test hands out: it stands in for
// the hub session only for faults the real one (azsim) cannot produce on
// demand: PUBACKs held back, and a connection lost at an exact point of
// the window.
type fakeHub struct {
	mu      sync.Mutex
	sent    []published
	acked   int           // PUBACKs given for the first acked publishes
	lost    bool          // the connection is gone: every wait fails
	changed chan struct{} // closed and replaced on every change
}

type published struct {
	body        []byte
	mid, ct, ce string
	app         map[string]string
}

func newFakeHub(acked int) *fakeHub { return &fakeHub{acked: acked, changed: make(chan struct{})} }

func (h *fakeHub) PublishTelemetry(body []byte, system, app map[string]string) func(context.Context) error {
	h.mu.Lock()
	i := len(h.sent)
	h.sent = append(h.sent, published{bytes.Clone(body), system["mid"], system["ct"], system["ce"], maps.Clone(app)})
	h.signal()
	h.mu.Unlock()
	return func(ctx context.Context) error {
		for {
			h.mu.Lock()
			lost, acked, ch := h.lost, i < h.acked, h.changed
			h.mu.Unlock()
			switch {
			case acked:
				return nil
			case lost:
				return errors.New("fake hub: connection lost before PUBACK")
			}
			select {
			case <-ch:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
}

func (h *fakeHub) signal() { close(h.changed); h.changed = make(chan struct{}) }

// ack gives PUBACKs for the first n publishes; lose drops the connection.
func (h *fakeHub) ack(n int) { h.mu.Lock(); h.acked = n; h.signal(); h.mu.Unlock() }
func (h *fakeHub) lose()     { h.mu.Lock(); h.lost = true; h.signal(); h.mu.Unlock() }

func (h *fakeHub) published() []published {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]published(nil), h.sent...)
}

// The connection is lost with a window in flight, part of it acknowledged
// (an exact point azsim cannot be made to drop at). The drain ends; what
// was acknowledged is acked in the outbox and its spool files leave the
// spool; the rest stays, with its files, and the next session sends
// exactly that again, in order and under the same message ids.
func TestDrainConnectionLost(t *testing.T) {
	clk := clock.NewFake(time.Now().Add(time.Hour)) // spool files are long settled
	r := newRig(t, rigOpts{clock: clk})
	const n, acked = 10, 4
	for i := 0; i < n; i++ {
		testenv.SpoolPut(t, r.spool, fmt.Sprintf("m%02d.json", i), []byte(fmt.Sprintf(`{"n":%d}`, i)))
	}
	testenv.Eventually(t, 10*time.Second, "all queued", func() bool { return r.depth() == n })
	first := newFakeHub(acked)
	ended := make(chan struct{})
	go func() { defer close(ended); r.p.Drain(context.Background(), first) }()
	testenv.Eventually(t, 10*time.Second, "the window published", func() bool { return len(first.published()) == n })
	testenv.Eventually(t, 10*time.Second, "the first PUBACKs recorded", func() bool { return r.depth() == n-acked })
	first.lose()
	select { // Drain returns once its acker and retirer have ended
	case <-ended:
	case <-time.After(10 * time.Second):
		t.Fatal("the drain did not end when the connection was lost")
	}
	if d := r.depth(); d != n-acked {
		t.Fatalf("outbox holds %d messages after the loss, want the %d unacknowledged", d, n-acked)
	}
	testenv.Eventually(t, 10*time.Second, "the acknowledged files out of the spool", func() bool {
		for i := 0; i < acked; i++ {
			if _, err := os.Lstat(filepath.Join(r.spool, fmt.Sprintf("m%02d.json", i))); err == nil {
				return false
			}
		}
		return true
	})
	for i := acked; i < n; i++ {
		if _, err := os.Lstat(filepath.Join(r.spool, fmt.Sprintf("m%02d.json", i))); err != nil {
			t.Fatalf("spool file %d gone though its message was never acknowledged: %v", i, err)
		}
	}

	second := newFakeHub(1 << 30)
	r.drain(second)
	testenv.Eventually(t, 10*time.Second, "the rest sent and acked", func() bool { return r.depth() == 0 })
	again, before := second.published(), first.published()
	if len(again) != n-acked {
		t.Fatalf("the next session sent %d messages, want the %d unacknowledged", len(again), n-acked)
	}
	for i, m := range again {
		want := before[acked+i]
		if !bytes.Equal(m.body, want.body) || m.mid != want.mid {
			t.Fatalf("resent #%d: %s (%s), want %s (%s): in order, same id", i, m.body, m.mid, want.body, want.mid)
		}
	}
	testenv.Eventually(t, 10*time.Second, "every spool file out of the spool", func() bool {
		m, _ := filepath.Glob(filepath.Join(r.spool, "*.json"))
		return len(m) == 0
	})
}

// With PUBACKs held back (azsim answers every publish at once), at most
// drainBytes (1 MiB) of bodies are in flight, and each PUBACK lets the
// next message go.
func TestDrainWindowBytes(t *testing.T) {
	r := newRig(t, rigOpts{clock: clock.NewFake(time.Now())})
	body := bytes.Repeat([]byte("x"), 100<<10)
	for i := 0; i < 12; i++ {
		if err := r.p.Enqueue(&outbox.Message{Kind: outbox.KindHealth, Body: body}); err != nil {
			t.Fatal(err)
		}
	}
	h := newFakeHub(0)
	r.drain(h)
	testenv.Eventually(t, 10*time.Second, "a window's worth published", func() bool { return len(h.published()) == 10 })
	time.Sleep(200 * time.Millisecond) // an 11th publish would follow at once
	if n := len(h.published()); n != 10 {
		t.Fatalf("%d messages of 100 KiB in flight, want 10 (1 MiB)", n)
	}
	h.ack(1)
	testenv.Eventually(t, 10*time.Second, "one more after one PUBACK", func() bool { return len(h.published()) == 11 })
	time.Sleep(200 * time.Millisecond)
	if n := len(h.published()); n != 11 {
		t.Fatalf("%d published after one PUBACK, want 11", n)
	}
	h.ack(12)
	testenv.Eventually(t, 10*time.Second, "the rest", func() bool { return len(h.published()) == 12 && r.depth() == 0 })
}
