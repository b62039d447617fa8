package outbox

import (
	"bytes"
	"errors"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/devtools/testenv"
)

// A full disk (a real tmpfs filled up) while messages wait in memory for
// the write-behind: a Put that cannot write the older ones out fails with
// ENOSPC and leaves no trace (no half-queued message, no reused seq, no
// new segment file per failed write); once there is room again, Put works
// and everything queued is there once, in order.
func TestOutboxDiskFull(t *testing.T) {
	mnt := filepath.Join(t.TempDir(), "fs")
	testenv.Tmpfs(t, mnt, "size=256k,nr_inodes=64")
	dir := filepath.Join(mnt, "outbox")
	o := openT(t, dir, Options{WriteBehind: time.Hour, MaxPendingBytes: 16 << 10})
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
	lastID := ms[len(ms)-1].ID
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}

	// Opened again on a disk without a free block or inode (a gateway
	// rebooted with its disk full): it opens, and ids stay new.
	free = testenv.Fill(t, mnt, true)
	defer free()
	o2, err := Open(dir, Options{WriteBehind: time.Hour})
	if err != nil {
		t.Fatalf("the outbox does not open on a full disk: %v", err)
	}
	defer o2.Close()
	m := &Message{Kind: KindApp, Local: "/spool/m.json", Body: []byte("{}")}
	if _, err := o2.Put(m); err != nil {
		t.Fatal(err)
	}
	if epochOf(t, m.ID) <= epochOf(t, lastID) {
		t.Fatalf("id %s after reopening is not of a newer epoch than %s", m.ID, lastID)
	}
	o2.Close()
	o3 := openT(t, dir, Options{})
	m3 := &Message{Kind: KindHealth, Body: []byte("{}")}
	o3.Put(m3)
	if epochOf(t, m3.ID) <= epochOf(t, m.ID) {
		t.Fatalf("the epoch written in place was not read back: id %s after %s", m3.ID, m.ID)
	}
}

// epochOf returns the epoch of a default message id (id-epoch.n).
func epochOf(t *testing.T, id string) uint64 {
	t.Helper()
	_, rest, _ := strings.Cut(id, "-")
	e, _, _ := strings.Cut(rest, ".")
	n, err := strconv.ParseUint(e, 10, 64)
	if err != nil {
		t.Fatalf("id %q: %v", id, err)
	}
	return n
}
