package telemetry_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/condition"
	"github.com/gwagent/gwagent/telemetry/outbox"
)

// The state directory's file system (a real tmpfs) is full when a spool
// file arrives: the pipeline raises disk-full naming the directory, keeps
// the file in the spool, and looks for room every 5 s on the fake clock;
// space freed, the next look clears the condition and queues the file,
// without a restart. No test time is spent waiting for the 5 s.
func TestSpoolDiskFullRetry(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state")
	testenv.Tmpfs(t, state, "size=1m,nr_inodes=256,mode=0700")
	clk := clock.NewFake(time.Now().Add(time.Hour)) // spool files are long settled
	// Written at once (no write-behind timer): the rescan ticker and, while
	// the disk is full, the disk ticker are the only timers.
	r := newRig(t, rigOpts{clock: clk, stateDir: state, outbox: outbox.Options{WriteBehind: -1}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	free := testenv.Fill(t, state, false)
	testenv.SpoolPut(t, r.spool, "m.json", []byte(`{"full":1}`))
	testenv.Eventually(t, 10*time.Second, "disk-full raised", func() bool { return r.sink.Has(condition.DiskFull) })
	if reason, _ := r.sink.reason(condition.DiskFull); !strings.Contains(reason, state) || !strings.Contains(reason, "free space") {
		t.Fatalf("the disk-full reason does not say where and what to do: %q", reason)
	}
	if err := clk.BlockUntil(ctx, 2); err != nil {
		t.Fatal("no disk check armed while the disk is full")
	}
	if r.depth() != 0 {
		t.Fatalf("%d messages queued without room", r.depth())
	}
	if _, err := os.Lstat(filepath.Join(r.spool, "m.json")); err != nil {
		t.Fatalf("the spool file is gone though it was never queued: %v", err)
	}

	free()
	clk.Advance(5*time.Second - time.Millisecond)
	time.Sleep(200 * time.Millisecond) // a look now would clear it at once
	if !r.sink.Has(condition.DiskFull) || r.depth() != 0 {
		t.Fatal("disk-full cleared before the next look")
	}
	clk.Advance(time.Millisecond)
	testenv.Eventually(t, 10*time.Second, "disk-full cleared and the waiting file queued", func() bool {
		return !r.sink.Has(condition.DiskFull) && r.depth() == 1
	})
}
