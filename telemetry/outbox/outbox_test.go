package outbox

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/internal/clock"
)

// TestMain doubles as a child that queues messages and is SIGKILLed.
func TestMain(m *testing.M) {
	if dir := os.Getenv("GWAGENT_TEST_OUTBOX_CHILD"); dir != "" {
		o, err := Open(dir, Options{SegmentBytes: 4096})
		if err != nil {
			panic(err)
		}
		n, _ := strconv.Atoi(os.Getenv("GWAGENT_TEST_OUTBOX_N"))
		acks, _ := strconv.Atoi(os.Getenv("GWAGENT_TEST_OUTBOX_ACK"))
		for i := 0; i < n; i++ {
			if _, err := o.Put(&Message{Kind: KindApp, Body: []byte(fmt.Sprintf(`{"n":%d}`, i))}); err != nil {
				panic(err)
			}
		}
		ms, _ := o.Next(0, acks)
		for _, m := range ms {
			if err := o.Ack(m.Seq); err != nil {
				panic(err)
			}
		}
		// Everything Put and Ack returned for is written: die without Close.
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	}
	os.Exit(m.Run())
}

func openT(t *testing.T, dir string, opts Options) *Outbox {
	t.Helper()
	o, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o.Close() })
	return o
}

func bodies(t *testing.T, o *Outbox) []string {
	t.Helper()
	ms, err := o.Next(0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range ms {
		out = append(out, string(m.Body))
	}
	return out
}

func TestOutboxPutNextAck(t *testing.T) {
	dir := t.TempDir()
	o := openT(t, dir, Options{})
	for i := 0; i < 3; i++ {
		if _, err := o.Put(&Message{Kind: KindApp, System: map[string]string{"ct": "application/json"}, App: map[string]string{"i": strconv.Itoa(i)}, Local: "spool/" + strconv.Itoa(i), Body: []byte{'a' + byte(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	ms, _ := o.Next(0, 10)
	if len(ms) != 3 || string(ms[0].Body) != "a" || ms[2].App["i"] != "2" || ms[1].System["ct"] != "application/json" || ms[1].Local != "spool/1" {
		t.Fatalf("Next: %+v", ms)
	}
	if !strings.HasPrefix(ms[0].ID, o.ID()+"-") || ms[0].ID == ms[1].ID || ms[0].Seq >= ms[1].Seq {
		t.Fatalf("ids/seqs: %q %d %d", ms[0].ID, ms[0].Seq, ms[1].Seq)
	}
	if after, _ := o.Next(ms[0].Seq, 10); len(after) != 2 {
		t.Fatalf("Next(after first) = %d messages", len(after))
	}
	o.Ack(ms[0].Seq)
	o.Ack(ms[1].Seq)
	o.Ack(ms[1].Seq) // twice is harmless
	if n, _ := o.Depth(); n != 1 {
		t.Fatalf("depth %d after two acks", n)
	}
	if seq, at := o.LastAcked(); seq != ms[1].Seq || at.IsZero() {
		t.Fatalf("LastAcked = %d %v", seq, at)
	}
	id := o.ID()
	o.Close()
	o2 := openT(t, dir, Options{})
	if got := bodies(t, o2); len(got) != 1 || got[0] != "c" {
		t.Fatalf("after reopen: %v", got)
	}
	if o2.ID() != id {
		t.Fatal("outbox id changed on reopen: message ids would not be stable")
	}
	if _, err := o2.Put(&Message{Kind: KindApp, Body: []byte("d")}); err != nil {
		t.Fatal(err)
	}
	if ms, _ := o2.Next(0, 10); ms[1].Seq <= ms[0].Seq {
		t.Fatal("sequence numbers reused after reopen")
	}
}

// TestOutboxSurvivesKill: messages Put before a SIGKILL are all there after.
func TestOutboxSurvivesKill(t *testing.T) {
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "GWAGENT_TEST_OUTBOX_CHILD="+dir, "GWAGENT_TEST_OUTBOX_N=500")
	var ee *exec.ExitError
	if err := cmd.Run(); !errors.As(err, &ee) {
		t.Fatalf("child: %v", err)
	}
	o := openT(t, dir, Options{SegmentBytes: 4096})
	got := bodies(t, o)
	if len(got) != 500 {
		t.Fatalf("%d messages after SIGKILL, want 500", len(got))
	}
	for i, b := range got {
		if b != fmt.Sprintf(`{"n":%d}`, i) {
			t.Fatalf("message %d = %s: order or content lost", i, b)
		}
	}
}

// TestOutboxTornTail: a power cut mid-write leaves a partial record; it is
// cut off and everything before it survives.
func TestOutboxTornTail(t *testing.T) {
	dir := t.TempDir()
	o, _ := Open(dir, Options{})
	o.Put(&Message{Kind: KindApp, Body: []byte("one")}, &Message{Kind: KindApp, Body: []byte("two")})
	o.Close()
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	f, _ := os.OpenFile(segs[0], os.O_WRONLY|os.O_APPEND, 0)
	f.Write([]byte{200, 0, 0, 0, 1, 2, 3}) // a header promising 200 bytes, then nothing
	f.Close()
	o2 := openT(t, dir, Options{})
	if got := bodies(t, o2); len(got) != 2 || got[1] != "two" {
		t.Fatalf("after torn tail: %v", got)
	}
	o2.Put(&Message{Kind: KindApp, Body: []byte("three")})
	o2.Close()
	o3 := openT(t, dir, Options{})
	if got := bodies(t, o3); len(got) != 3 || got[2] != "three" {
		t.Fatalf("append after torn tail: %v", got)
	}
}

func TestOutboxEviction(t *testing.T) {
	o := openT(t, t.TempDir(), Options{MaxBytes: 800})
	body := bytes.Repeat([]byte("x"), 100)
	put := func(k Kind, tag string) (int, error) {
		return o.Put(&Message{Kind: k, App: map[string]string{"tag": tag}, Body: body})
	}
	for i := 0; i < 3; i++ {
		put(KindHealth, "h"+strconv.Itoa(i))
		put(KindApp, "a"+strconv.Itoa(i))
	}
	// Full now; more app messages push out health messages, oldest first.
	ev, err := put(KindApp, "a3")
	if err != nil || ev == 0 {
		t.Fatalf("app put when full: evicted %d, %v", ev, err)
	}
	ms, _ := o.Next(0, 100)
	if ms[0].App["tag"] == "h0" {
		t.Fatal("oldest health message not evicted first")
	}
	for {
		if _, err = put(KindApp, "more"); err != nil {
			break
		}
	}
	if !errors.Is(err, ErrFull) {
		t.Fatalf("got %v, want ErrFull", err)
	}
	ms, _ = o.Next(0, 100)
	seen := map[string]bool{}
	for _, m := range ms {
		if m.Kind == KindHealth {
			t.Fatal("health message kept while application messages were refused")
		}
		seen[m.App["tag"]] = true
	}
	for _, tag := range []string{"a0", "a1", "a2", "a3"} {
		if !seen[tag] {
			t.Fatalf("application message %s was evicted", tag)
		}
	}
	// A health message that does not fit is dropped, not an error.
	if ev, err := put(KindHealth, "h9"); err != nil || ev == 0 {
		t.Fatalf("health put when full of app messages: %d %v", ev, err)
	}
}

func TestOutboxReclaimsSpace(t *testing.T) {
	dir := t.TempDir()
	o := openT(t, dir, Options{SegmentBytes: 2048})
	for i := 0; i < 200; i++ {
		o.Put(&Message{Kind: KindApp, Body: bytes.Repeat([]byte("y"), 50)})
	}
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	if len(segs) < 5 {
		t.Fatalf("expected rotation, got %d segments", len(segs))
	}
	ms, _ := o.Next(0, 1000)
	for _, m := range ms {
		o.Ack(m.Seq)
	}
	o.Flush()
	segs, _ = filepath.Glob(filepath.Join(dir, "*.seg"))
	if len(segs) > 1 {
		t.Fatalf("%d segment files left after acking everything", len(segs))
	}
	var total int64
	for _, p := range segs {
		st, _ := os.Stat(p)
		total += st.Size()
	}
	if total > 2048+4096 {
		t.Fatalf("%d bytes of segments left after acking everything", total)
	}
}

// TestOutboxGroupCommit: concurrent producers share fsyncs.
func TestOutboxGroupCommit(t *testing.T) {
	o := openT(t, t.TempDir(), Options{})
	var wg sync.WaitGroup
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				if _, err := o.Put(&Message{Kind: KindApp, Body: []byte("z")}); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	if n, _ := o.Depth(); n != 320 {
		t.Fatalf("depth %d, want 320", n)
	}
	ms, _ := o.Next(0, 1000)
	for i := 1; i < len(ms); i++ {
		if ms[i].Seq <= ms[i-1].Seq {
			t.Fatal("out of order")
		}
	}
	o.syncMu.Lock()
	n := o.fsyncs
	o.syncMu.Unlock()
	if n >= 320 {
		t.Fatalf("%d fsyncs for 320 concurrent puts: no group commit", n)
	}
	t.Logf("%d fsyncs for 320 puts from 16 producers", n)
}

func killChild(t *testing.T, dir string, n, acks int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "GWAGENT_TEST_OUTBOX_CHILD="+dir, "GWAGENT_TEST_OUTBOX_N="+strconv.Itoa(n), "GWAGENT_TEST_OUTBOX_ACK="+strconv.Itoa(acks))
	var ee *exec.ExitError
	if err := cmd.Run(); !errors.As(err, &ee) {
		t.Fatalf("child: %v", err)
	}
}

// TestOutboxAckSurvivesKill: acks are written before Ack returns, so a
// SIGKILL right after acking sends none of them again (issue 10: 100 of 100
// acked messages came back after a SIGKILL).
func TestOutboxAckSurvivesKill(t *testing.T) {
	dir := t.TempDir()
	killChild(t, dir, 300, 250)
	o := openT(t, dir, Options{SegmentBytes: 4096})
	got := bodies(t, o)
	if len(got) != 50 {
		t.Fatalf("%d messages after SIGKILL with 250 of 300 acked, want 50", len(got))
	}
	if got[0] != `{"n":250}` || got[49] != `{"n":299}` {
		t.Fatalf("wrong survivors: first %s last %s", got[0], got[49])
	}
	if c := o.Corrupted(); len(c) != 0 {
		t.Fatalf("clean kill reported as corruption: %+v", c)
	}
}

// TestOutboxIDsNeverReused: a message id names one message, across clean
// restarts, SIGKILLs and an emptied outbox.
func TestOutboxIDsNeverReused(t *testing.T) {
	dir := t.TempDir()
	seen := map[string]bool{}
	take := func(o *Outbox) {
		t.Helper()
		for i := 0; i < 3; i++ {
			m := &Message{Kind: KindHealth, Body: []byte("h")}
			if _, err := o.Put(m); err != nil {
				t.Fatal(err)
			}
			if seen[m.ID] {
				t.Fatalf("message id %s reused", m.ID)
			}
			seen[m.ID] = true
			o.Ack(m.Seq)
		}
	}
	for round := 0; round < 3; round++ {
		o, err := Open(dir, Options{})
		if err != nil {
			t.Fatal(err)
		}
		take(o)
		o.Close()
	}
	// A killed run (no Close) and a lost epoch file do not rewind either.
	killChild(t, dir, 5, 0)
	o := openT(t, dir, Options{})
	for _, m := range mustNext(t, o) {
		seen[m.ID] = true
	}
	o.Close()
	os.Remove(filepath.Join(dir, "epoch"))
	o = openT(t, dir, Options{})
	take(o)
}

func mustNext(t *testing.T, o *Outbox) []*Message {
	t.Helper()
	ms, err := o.Next(0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	return ms
}

// writeRecord appends a raw record with a valid CRC to a segment file.
func writeRecord(t *testing.T, path string, payload []byte) {
	t.Helper()
	rec := append(make([]byte, recHeader), payload...)
	seal(rec)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write(rec)
	f.Close()
}

// TestOutboxCorruptRecords: a record with a valid CRC but short or
// malformed metadata (it made every start panic) and a damaged region are
// skipped and reported with the segment; everything around them survives.
func TestOutboxCorruptRecords(t *testing.T) {
	for _, tc := range []struct {
		name    string
		damage  func(t *testing.T, seg string)
		skipped int
	}{
		{"fail/short-metadata", func(t *testing.T, seg string) {
			writeRecord(t, seg, []byte{3, 0, 0, 0, 0, 0, 0, 0, byte(KindApp)})
		}, 1},
		{"fail/metadata-length-past-end", func(t *testing.T, seg string) {
			writeRecord(t, seg, []byte{3, 0, 0, 0, 0, 0, 0, 0, byte(KindApp), 0xff, 0x7f, 'x'})
		}, 1},
		{"fail/unknown-type", func(t *testing.T, seg string) {
			writeRecord(t, seg, []byte{3, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0})
		}, 1},
		{"fail/garbage-region", func(t *testing.T, seg string) {
			f, _ := os.OpenFile(seg, os.O_WRONLY|os.O_APPEND, 0)
			f.Write(bytes.Repeat([]byte{0xa5, 0x5a, 0x01}, 100))
			f.Close()
		}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			o, _ := Open(dir, Options{})
			o.Put(&Message{Kind: KindApp, Body: []byte("one")}, &Message{Kind: KindApp, Body: []byte("two")})
			o.Close()
			segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
			tc.damage(t, segs[0])
			// A good record after the damage is still found.
			o, _ = Open(dir, Options{})
			ms := mustNext(t, o)
			o.Close()
			rec := append(make([]byte, recHeader), binary.LittleEndian.AppendUint64(nil, ms[1].Seq+1)...)
			rec = append(rec, byte(KindApp))
			rec = appendMeta(rec, "", "", nil, nil)
			rec = append(rec, "three"...)
			writeRecord(t, segs[0], rec[recHeader:])

			o2, err := Open(dir, Options{})
			if err != nil {
				t.Fatalf("open after damage: %v", err)
			}
			defer o2.Close()
			if got := bodies(t, o2); strings.Join(got, ",") != "one,two,three" {
				t.Fatalf("messages around the damage: %v", got)
			}
			c := o2.Corrupted()
			if len(c) != 1 || c[0].Segment != filepath.Base(segs[0]) || c[0].Skipped != tc.skipped || c[0].Bytes == 0 {
				t.Fatalf("corruption report %+v, want %d skipped in %s", c, tc.skipped, filepath.Base(segs[0]))
			}
		})
	}
}

// TestOutboxAcksShareSegment: at one message a second, messages and acks
// go to the same file, so flash pages are filled rather than each ack
// dirtying a page of its own; and nothing but app messages without a
// producer's copy is fsynced.
func TestOutboxAcksShareSegment(t *testing.T) {
	dir := t.TempDir()
	o := openT(t, dir, Options{WriteBehind: -1})
	for i := 0; i < 50; i++ {
		m := &Message{Kind: KindHealth, Body: bytes.Repeat([]byte("h"), 300)}
		o.Put(m)
		o.Put(&Message{Kind: KindApp, Local: "spool/x.json", Body: []byte("{}")})
		o.Ack(m.Seq)
	}
	ents, _ := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if len(names) != 3 { // epoch, id, one segment
		t.Fatalf("files %v: acks should share the segment", names)
	}
	o.syncMu.Lock()
	defer o.syncMu.Unlock()
	if o.fsyncs != 0 {
		t.Fatalf("%d fsyncs for health and spool messages", o.fsyncs)
	}
}

// TestOutboxWriteBehind: while the hub acknowledges within WriteBehind, the
// outbox writes nothing; what is not acknowledged by then is written out
// (and survives a restart); a message without a producer's copy is written
// and fsynced at once, after the older ones held in memory.
func TestOutboxWriteBehind(t *testing.T) {
	dir := t.TempDir()
	clk := clock.NewFake(time.Now())
	o := openT(t, dir, Options{WriteBehind: time.Hour, Clock: clk})
	segs := func() int { m, _ := filepath.Glob(filepath.Join(dir, "*.seg")); return len(m) }
	for i := 0; i < 20; i++ {
		m := &Message{Kind: KindHealth, Body: []byte("h")}
		o.Put(m)
		o.Put(&Message{Kind: KindApp, Local: "spool/a.json", Body: []byte("{}")})
		ms := mustNext(t, o)
		for _, x := range ms {
			o.Ack(x.Seq)
		}
	}
	if n := segs(); n != 0 {
		t.Fatalf("%d segment files written for messages acknowledged at once", n)
	}
	if clk.Pending() != 0 {
		t.Fatal("a timer is left armed with nothing to write (an idle wakeup)")
	}
	o.Put(&Message{Kind: KindHealth, Body: []byte("late")})
	clk.Advance(time.Hour - time.Millisecond)
	if segs() != 0 {
		t.Fatal("a message was written out before its write-behind time")
	}
	clk.Advance(time.Millisecond) // the write-out runs on a goroutine of its own
	testenv.Eventually(t, 10*time.Second, "the unacknowledged message written out when due", func() bool { return segs() == 1 })
	o.Put(&Message{Kind: KindHealth, Body: []byte("held")})
	o.Put(&Message{Kind: KindApp, Body: []byte("durable")})
	o.closeFiles() // SIGKILL: nothing flushed by Close
	o2 := openT(t, dir, Options{WriteBehind: time.Hour, Clock: clk})
	if got := strings.Join(bodies(t, o2), ","); got != "late,held,durable" {
		t.Fatalf("after a kill: %s, want late,held,durable (in order)", got)
	}
}

// Receipts written with acks survive a crash (the outbox is not closed),
// keep their segment until retired, and go with it after; a message's
// LocalID survives a restart.
func TestOutboxReceipts(t *testing.T) {
	dir := t.TempDir()
	o, err := Open(dir, Options{SegmentBytes: 2048, WriteBehind: -1})
	if err != nil {
		t.Fatal(err)
	}
	id := FileID{Dev: 2049, Ino: 12345, Size: 99, Mtime: 1_700_000_000_123_456_789}
	if _, err := o.Put(&Message{Kind: KindApp, Local: "/var/lib/gwagent/spool/a.json", LocalID: id, Body: []byte(`{"a":1}`)}); err != nil {
		t.Fatal(err)
	}
	ms, _ := o.Next(0, 1)
	if ms[0].Local != "/var/lib/gwagent/spool/a.json" || ms[0].LocalID != id {
		t.Fatalf("Local %q LocalID %+v read back, want the ones put", ms[0].Local, ms[0].LocalID)
	}
	var files []Receipt
	for i := 0; i < 150; i++ { // more than one record's worth, two directories
		d := "/var/lib/gwagent/spool"
		if i >= 140 {
			d = "/srv/spool"
		}
		files = append(files, Receipt{Path: fmt.Sprintf("%s/r%03d.json", d, i), ID: FileID{Dev: 2049, Ino: uint64(i), Size: 10, Mtime: int64(i) * 1e9}})
	}
	files, err = o.Deliver([]uint64{ms[0].Seq}, files, true) // an ack is written: the receipts ride along
	if err != nil {
		t.Fatal(err)
	}
	// A crash: no Close. The same directory opened again finds them.
	o2 := openT(t, dir, Options{SegmentBytes: 2048})
	got := o2.Receipts()
	if len(got) != len(files) {
		t.Fatalf("%d receipts after a crash, want %d", len(got), len(files))
	}
	for i := range got {
		if got[i].Path != files[i].Path || got[i].ID != files[i].ID {
			t.Fatalf("receipt %d = %+v, want %+v", i, got[i], files[i])
		}
	}
	if o2.Receipts() != nil {
		t.Fatal("Receipts handed out twice")
	}
	// Until retired they keep their segment, even with no message left.
	segsBefore, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	for i := 0; i < 100; i++ { // fills and rotates segments
		o2.Put(&Message{Kind: KindApp, Body: bytes.Repeat([]byte("z"), 60)})
	}
	all, _ := o2.Next(0, 1000)
	for _, m := range all {
		o2.Ack(m.Seq)
	}
	if _, err := os.Stat(segsBefore[0]); err != nil {
		t.Fatalf("the segment holding unretired receipts was deleted: %v", err)
	}
	o2.Retired(got...)
	for i := 0; i < 100; i++ {
		o2.Put(&Message{Kind: KindApp, Body: bytes.Repeat([]byte("z"), 60)})
	}
	all, _ = o2.Next(0, 1000)
	for _, m := range all {
		o2.Ack(m.Seq)
	}
	if _, err := os.Stat(segsBefore[0]); !os.IsNotExist(err) {
		t.Fatalf("the segment of retired receipts is still there: %v", err)
	}
}

// Held receipts of a message acked from memory write nothing: the
// producer removes its file at once.
func TestOutboxReceiptsHeld(t *testing.T) {
	dir := t.TempDir()
	o, _ := Open(dir, Options{})
	m := &Message{Kind: KindApp, Local: "/spool/a.json", LocalID: FileID{Ino: 1}, Body: []byte("{}")}
	o.Put(m)
	rs, err := o.Deliver([]uint64{m.Seq}, []Receipt{{Path: m.Local, ID: m.LocalID}}, true)
	if err != nil {
		t.Fatal(err)
	}
	o.Retired(rs...) // not on disk: nothing to do
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	if len(segs) != 0 {
		t.Fatalf("a message acked from memory with a held receipt wrote %v", segs)
	}
	// Not held: written even with no ack record to share.
	m2 := &Message{Kind: KindApp, Local: "/spool/b.json", LocalID: FileID{Ino: 2}, Body: []byte("{}")}
	o.Put(m2)
	if _, err := o.Deliver([]uint64{m2.Seq}, []Receipt{{Path: m2.Local, ID: m2.LocalID}}, false); err != nil {
		t.Fatal(err)
	}
	o2 := openT(t, dir, Options{})
	if got := o2.Receipts(); len(got) != 1 || got[0].Path != "/spool/b.json" || got[0].ID.Ino != 2 {
		t.Fatalf("receipts after reopen: %+v", got)
	}
}
