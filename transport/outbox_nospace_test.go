package transport

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/testenv"
)

// A full disk (a real tmpfs filled up) while messages wait in memory for
// the write-behind: a Put that cannot write the older ones out fails with
// ENOSPC and leaves no trace (no half-queued message, no reused seq, no
// new segment file per failed write); once there is room again, Put works
// and everything queued is there once, in order.
func TestOutboxDiskFull(t *testing.T) {
	mnt := filepath.Join(t.TempDir(), "fs")
	testenv.Tmpfs(t, mnt, "size=256k")
	dir := filepath.Join(mnt, "outbox")
	o := openT(t, dir, OutboxOptions{WriteBehind: time.Hour, MaxPendingBytes: 16 << 10})
	free := testenv.Fill(t, mnt, false)

	body := bytes.Repeat([]byte("x"), 4000)
	queued := 0
	var failed error
	for i := 0; i < 20; i++ {
		_, err := o.Put(&Message{Kind: KindApp, Local: "/spool/m.json", Body: body})
		if err != nil {
			failed = err
			continue
		}
		if failed != nil {
			t.Fatalf("Put %d succeeded after an earlier one failed for lack of space", i)
		}
		queued++
	}
	if !errors.Is(failed, syscall.ENOSPC) {
		t.Fatalf("want Put to fail with ENOSPC once the memory bound is reached on a full disk, got %v", failed)
	}
	check := func(want int) {
		t.Helper()
		n, _ := o.Depth()
		ms, err := o.Next(0, 100)
		if err != nil {
			t.Fatal(err)
		}
		if n != want || len(ms) != want {
			t.Fatalf("depth %d, Next returned %d messages; want %d", n, len(ms), want)
		}
		for i := 1; i < len(ms); i++ {
			if ms[i].Seq <= ms[i-1].Seq || ms[i].ID == ms[i-1].ID {
				t.Fatalf("messages %d and %d share seq %d / id %s", i-1, i, ms[i].Seq, ms[i].ID)
			}
		}
	}
	check(queued)
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	if len(segs) > 2 {
		t.Fatalf("%d segment files after the failed writes: a new one per failure", len(segs))
	}

	free()
	for i := 0; i < 3; i++ {
		if _, err := o.Put(&Message{Kind: KindApp, Local: "/spool/m.json", Body: body}); err != nil {
			t.Fatalf("Put after space was freed: %v", err)
		}
	}
	check(queued + 3)
	ms, _ := o.Next(0, 100)
	for _, m := range ms {
		if err := o.Ack(m.Seq); err != nil {
			t.Fatal(err)
		}
	}
	check(0)
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatal(err)
	}
}
