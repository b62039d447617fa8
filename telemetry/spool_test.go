package telemetry_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/azsimtest"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/dirwatch"
	"github.com/gwagent/gwagent/telemetry"
	"github.com/gwagent/gwagent/telemetry/outbox"
	"golang.org/x/sys/unix"
)

// A file name used again after its message was delivered is a new
// message.
func TestSpoolNameReused(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	r := newRig(t, rigOpts{})
	r.drain(hubSession(t, az, "gw-spool-reuse"))
	p := filepath.Join(r.spool, "m.json")
	for i := 1; i <= 3; i++ {
		testenv.SpoolPut(t, r.spool, "m.json", []byte(fmt.Sprintf(`{"reused":%d}`, i)))
		testenv.Eventually(t, 20*time.Second, fmt.Sprintf("message %d delivered and its file deleted", i), func() bool {
			_, err := os.Lstat(p)
			return len(bodiesWith(az, "gw-spool-reuse", "reused")) == i && os.IsNotExist(err)
		})
	}
	// The same content again is a new message too, with a new id.
	testenv.SpoolPut(t, r.spool, "m.json", []byte(`{"reused":3}`))
	testenv.Eventually(t, 20*time.Second, "the repeated content delivered again", func() bool {
		return len(bodiesWith(az, "gw-spool-reuse", "reused")) == 4
	})
	ids := map[any]bool{}
	for _, m := range received(az, "gw-spool-reuse") {
		props, _ := m["properties"].(map[string]any)
		sys, _ := props["system"].(map[string]any)
		if b, ok := m["body"].(map[string]any); ok && b["reused"] != nil {
			if sys["$.mid"] == nil || ids[sys["$.mid"]] {
				t.Fatalf("message id %v used twice", sys["$.mid"])
			}
			ids[sys["$.mid"]] = true
		}
	}
}

// A file replaced under the same name while its message waits in the
// outbox is a new message: both versions are delivered, in order, and the
// file leaves the spool once the second is (the retirer leaves a file that
// is not the version it retires).
func TestSpoolReplacedWhileQueued(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	r := newRig(t, rigOpts{})
	testenv.SpoolPut(t, r.spool, "m.json", []byte(`{"version":1}`))
	testenv.Eventually(t, 10*time.Second, "the first version queued", func() bool { return r.depth() == 1 })
	testenv.SpoolPut(t, r.spool, "m.json", []byte(`{"version":2}`))
	testenv.Eventually(t, 10*time.Second, "the second version queued", func() bool { return r.depth() == 2 })
	r.drain(hubSession(t, az, "gw-spool-replaced"))
	p := filepath.Join(r.spool, "m.json")
	testenv.Eventually(t, 20*time.Second, "both versions delivered and the file deleted", func() bool {
		_, err := os.Lstat(p)
		return len(bodiesWith(az, "gw-spool-replaced", "version")) == 2 && os.IsNotExist(err)
	})
	if got := fmt.Sprint(bodiesWith(az, "gw-spool-replaced", "version")); got != "[1 2]" {
		t.Fatalf("versions delivered %s, want [1 2]", got)
	}
}

// A file written in place in two chunks is sent whole: the pipeline waits
// until it has been unchanged for spool_settle. With a settle time of an
// hour, the half-written file cannot be sent during the test; once its
// modification time is older than that, the whole file is.
func TestSpoolHalfWrittenFile(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	r := newRig(t, rigOpts{settle: time.Hour})
	r.drain(hubSession(t, az, "gw-spool-half"))
	p := filepath.Join(r.spool, "counter.json")
	f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY, 0o640)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("12")
	f.Sync()
	// A renamed file written long ago is sent at once, so the pipeline has
	// certainly looked at the spool after the first chunk.
	old := filepath.Join(r.spool, ".old.tmp")
	os.WriteFile(old, []byte(`{"old":1}`), 0o640)
	past := time.Now().Add(-2 * time.Hour)
	os.Chtimes(old, past, past)
	os.Rename(old, filepath.Join(r.spool, "old.json"))
	testenv.Eventually(t, 20*time.Second, "the settled file", func() bool { return len(bodiesWith(az, "gw-spool-half", "old")) == 1 })
	f.WriteString("34")
	f.Close()
	os.Chtimes(p, past, past) // as if an hour had passed
	testenv.Eventually(t, 20*time.Second, "the whole file", func() bool {
		for _, m := range received(az, "gw-spool-half") {
			if m["body"] == float64(1234) {
				return true
			}
		}
		return false
	})
	for _, m := range received(az, "gw-spool-half") {
		if m["body"] == float64(12) {
			t.Fatalf("the half-written file was sent")
		}
	}
	if !strings.Contains(r.log.String(), "spool file queued") {
		t.Fatal("no spool log")
	}
}

// The settle rule on the fake clock: a file written in place is read only
// once it has been unchanged for the whole settle time, and a second chunk
// starts the wait again. Nothing here waits on the wall clock for the
// settle timer: the test moves the clock.
func TestSpoolSettle(t *testing.T) {
	const settle = 10 * time.Second
	// The fake clock starts at the wall clock's time, so the times the
	// kernel gives written files are recent for it, as they would be.
	clk := clock.NewFake(time.Now())
	// Messages are written to the outbox at once (no write-behind timer), so
	// the only timers are the rescan ticker and the settle timer.
	r := newRig(t, rigOpts{clock: clk, settle: settle, outbox: outbox.Options{WriteBehind: -1}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// A file whose modification time is older than the settle time is
	// read at once.
	old := filepath.Join(r.spool, ".old.tmp")
	os.WriteFile(old, []byte(`{"old":1}`), 0o640)
	past := clk.Now().Add(-time.Hour)
	os.Chtimes(old, past, past)
	os.Rename(old, filepath.Join(r.spool, "old.json"))
	testenv.Eventually(t, 10*time.Second, "the settled file queued", func() bool { return r.depth() == 1 })

	p := filepath.Join(r.spool, "counter.json")
	write := func(chunk string) {
		f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteString(chunk)
		f.Close()
		now := clk.Now()
		os.Chtimes(p, now, now) // the kernel's time, as the fake clock tells it
	}
	write("12")
	if err := clk.BlockUntil(ctx, 2); err != nil {
		t.Fatal("the settle timer was not armed for the written file")
	}
	clk.Advance(settle / 2)
	write("34") // a second chunk, half-way through the wait
	// The wait armed for the first chunk ends: the file is looked at, found
	// changed too recently, and waited for again.
	clk.Advance(settle / 2)
	if err := clk.BlockUntil(ctx, 2); err != nil {
		t.Fatal("the settle timer was not armed again for the second chunk")
	}
	if n := r.depth(); n != 1 {
		t.Fatalf("%d messages queued before the file settled, want only the old one", n)
	}
	clk.Advance(settle/2 - time.Millisecond)
	time.Sleep(200 * time.Millisecond) // a read now would queue it at once
	if n := r.depth(); n != 1 {
		t.Fatalf("%d messages queued a millisecond before the file settled", n)
	}
	clk.Advance(time.Millisecond)
	testenv.Eventually(t, 10*time.Second, "the whole file queued once settled", func() bool { return r.depth() == 2 })

	r.stop()
	o, err := outbox.Open(filepath.Join(r.state, "outbox"), outbox.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	ms, _ := o.Next(0, 10)
	var got []string
	for _, m := range ms {
		got = append(got, string(m.Body))
	}
	if strings.Join(got, " ") != `{"old":1} 1234` {
		t.Fatalf("queued %q, want the old file and the whole file, never a half-written one", got)
	}
}

// Without inotify (the per-user instance limit used up: injected, since
// exhausting the real limit would break other tests on the machine) the
// spool is scanned every dirwatch.PollEvery, on the fake clock: a file is
// queued at the next tick, not before; CondSpoolPolled says why; and once
// inotify can be had again the condition clears and files are seen at once.
func TestSpoolPolledWithoutInotify(t *testing.T) {
	clk := clock.NewFake(time.Now().Add(time.Hour)) // spool files are long settled
	var broken atomic.Bool
	broken.Store(true)
	r := newRig(t, rigOpts{clock: clk, outbox: outbox.Options{WriteBehind: -1}, inotify: func() (int, error) {
		if broken.Load() {
			return -1, errors.New("too many open files")
		}
		return unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The rescan ticker and the poll ticker.
	if err := clk.BlockUntil(ctx, 2); err != nil {
		t.Fatal("no poll timer armed without inotify")
	}
	if reason, _ := r.sink.reason(telemetry.CondSpoolPolled); !strings.Contains(reason, "too many open files") {
		t.Fatalf("condition %s = %q, want the inotify error", telemetry.CondSpoolPolled, reason)
	}
	testenv.SpoolPut(t, r.spool, "polled.json", []byte(`{"polled":1}`))
	clk.Advance(dirwatch.PollEvery - time.Millisecond)
	time.Sleep(200 * time.Millisecond) // a scan now would queue it at once
	if r.depth() != 0 {
		t.Fatal("a file was queued before the poll tick")
	}
	clk.Advance(time.Millisecond)
	testenv.Eventually(t, 10*time.Second, "the file queued at the poll tick", func() bool { return r.depth() == 1 })

	broken.Store(false)
	clk.Advance(dirwatch.PollEvery)
	testenv.Eventually(t, 10*time.Second, "inotify back and the condition cleared", func() bool { return !r.sink.Has(telemetry.CondSpoolPolled) })
	testenv.SpoolPut(t, r.spool, "watched.json", []byte(`{"watched":1}`))
	testenv.Eventually(t, 10*time.Second, "a file seen by inotify without a tick", func() bool { return r.depth() == 2 })
}

// Without inotify, a queued file replaced under the same name is queued
// again by the 30 s rescan, which then looks at every file; the poll tick
// every 2 s skips the files already queued (their lstat was most of a
// look's CPU with a large backlog).
func TestSpoolPolledReplacedWhileQueued(t *testing.T) {
	clk := clock.NewFake(time.Now().Add(time.Hour)) // spool files are long settled
	r := newRig(t, rigOpts{clock: clk, outbox: outbox.Options{WriteBehind: -1}, inotify: func() (int, error) {
		return -1, errors.New("too many open files")
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := clk.BlockUntil(ctx, 2); err != nil { // the rescan ticker and the poll ticker
		t.Fatal("no poll timer armed without inotify")
	}
	testenv.SpoolPut(t, r.spool, "m.json", []byte(`{"version":1}`))
	clk.Advance(dirwatch.PollEvery)
	testenv.Eventually(t, 10*time.Second, "the first version queued at a poll tick", func() bool { return r.depth() == 1 })
	testenv.SpoolPut(t, r.spool, "m.json", []byte(`{"version":2}`))
	clk.Advance(dirwatch.PollEvery)
	time.Sleep(200 * time.Millisecond) // a look at the queued file now would queue it at once
	if r.depth() != 1 {
		t.Fatal("the poll tick looked at a file already queued")
	}
	clk.Advance(30*time.Second - 2*dirwatch.PollEvery) // the rescan
	testenv.Eventually(t, 10*time.Second, "the second version queued at the rescan", func() bool { return r.depth() == 2 })
}
