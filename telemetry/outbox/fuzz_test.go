package outbox

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// FuzzSegmentReader: any bytes in a segment file, as a power cut, a bad
// flash block or a hostile neighbour may leave them, must neither panic
// nor stop the outbox from opening; what it reads back must be readable.
func FuzzSegmentReader(f *testing.F) {
	dir := f.TempDir()
	o, _ := Open(dir, Options{})
	o.Put(&Message{Kind: KindApp, System: map[string]string{"ct": "application/json"}, App: map[string]string{"a": "b"}, Local: "x", Body: []byte("{}")},
		&Message{Kind: KindHealth, Body: []byte("health")},
		&Message{Kind: KindApp, Local: "/spool/y.json", LocalID: FileID{Dev: 2049, Ino: 77, Size: 2, Mtime: 1e18}, Body: []byte("{}")})
	o.Flush()
	ms, _ := o.Next(0, 1)
	o.Deliver([]uint64{ms[0].Seq}, []Receipt{{Path: "/spool/y.json", ID: FileID{Dev: 2049, Ino: 77, Size: 2, Mtime: -5}},
		{Path: "/spool/z.json", ID: FileID{Dev: 2049, Ino: 1 << 40}}}, false)
	o.Close()
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	good, _ := os.ReadFile(segs[0])
	f.Add(good)
	f.Add(good[:len(good)-3])
	f.Add(append(bytes.Repeat([]byte{0}, 40), good...))
	short := append(make([]byte, recHeader), 1, 0, 0, 0, 0, 0, 0, 0, byte(KindApp))
	seal(short)
	f.Add(append(short, good...))
	f.Fuzz(func(t *testing.T, data []byte) {
		var last int64 = -1
		skipped, bad := ScanSegment(data, func(off int64, p []byte) {
			if off <= last || off+int64(recHeader+len(p)) > int64(len(data)) || !validPayload(p) {
				t.Fatalf("record at %d (%d bytes) out of order, out of bounds or invalid", off, len(p))
			}
			last = off
		})
		if skipped < 0 || bad < 0 || bad > int64(len(data)) {
			t.Fatalf("skipped %d, bad %d of %d bytes", skipped, bad, len(data))
		}
		d := t.TempDir()
		if err := os.WriteFile(filepath.Join(d, fmt.Sprintf("%020d.seg", 1)), data, 0o600); err != nil {
			t.Fatal(err)
		}
		o, err := Open(d, Options{noSync: true})
		if err != nil {
			t.Fatalf("open: %v", err)
		}
		defer o.Close()
		got, err := o.Next(0, 1<<20)
		if err != nil {
			t.Fatalf("next: %v", err)
		}
		for _, m := range got {
			if err := o.Ack(m.Seq); err != nil {
				t.Fatal(err)
			}
		}
		m := &Message{Kind: KindApp, Body: []byte("new")}
		if _, err := o.Put(m); err != nil {
			t.Fatal(err)
		}
		for _, old := range got {
			if old.ID == m.ID {
				t.Fatalf("new message got the id %s of a recovered one", m.ID)
			}
		}
	})
}

// FuzzAckLog: any interleaving of puts, acks, evictions, clean restarts
// and SIGKILL-like restarts keeps exactly the unacknowledged messages, in
// order, and never reuses an id.
func FuzzAckLog(f *testing.F) {
	f.Add([]byte{0, 0, 1, 2, 0, 3, 4, 0, 1})
	f.Add([]byte{0, 0, 0, 0, 0, 5, 5, 1, 1, 1, 4, 0, 2, 3})
	f.Fuzz(func(t *testing.T, ops []byte) {
		if len(ops) > 200 {
			ops = ops[:200]
		}
		dir := t.TempDir()
		opts := Options{SegmentBytes: 256, MaxBytes: 2048, WriteBehind: -1, noSync: true}
		o, err := Open(dir, opts)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { o.Close() }()
		type want struct {
			id   string
			body string
		}
		var model []want
		ids := map[string]bool{}
		n := 0
		for _, op := range ops {
			switch op % 6 {
			case 0, 5: // put an app or a health message
				k := KindApp
				if op%6 == 5 {
					k = KindHealth
				}
				n++
				m := &Message{Kind: k, Body: []byte(fmt.Sprintf("m%d", n))}
				ev, err := o.Put(m)
				if err != nil {
					continue // full of app messages: refused, not queued
				}
				if ev > 0 { // health messages were evicted: reload the model
					ms, _ := o.Next(0, 1<<20)
					model = model[:0]
					for _, x := range ms {
						if x.ID != m.ID {
							model = append(model, want{x.ID, string(x.Body)})
						}
					}
				}
				if ids[m.ID] {
					t.Fatalf("id %s reused", m.ID)
				}
				ids[m.ID] = true
				// A health message that found no room is dropped at once.
				if got, _ := o.Next(m.Seq-1, 1); len(got) == 1 && got[0].ID == m.ID {
					model = append(model, want{m.ID, string(m.Body)})
				}
			case 1, 2: // ack the first one or two queued messages in one call
				ms, _ := o.Next(0, int(op%6))
				var seqs []uint64
				for _, m := range ms {
					seqs = append(seqs, m.Seq)
					for i, w := range model {
						if w.id == m.ID {
							model = append(model[:i], model[i+1:]...)
							break
						}
					}
				}
				if err := o.Ack(seqs...); err != nil {
					t.Fatal(err)
				}
			case 3: // clean restart
				o.Close()
				if o, err = Open(dir, opts); err != nil {
					t.Fatal(err)
				}
			case 4: // SIGKILL: files closed, nothing flushed
				o.closeFiles()
				if o, err = Open(dir, opts); err != nil {
					t.Fatal(err)
				}
			}
			ms, err := o.Next(0, 1<<20)
			if err != nil {
				t.Fatal(err)
			}
			if len(ms) != len(model) {
				t.Fatalf("after op %d: %d messages queued, model has %d", op, len(ms), len(model))
			}
			for i, m := range ms {
				if m.ID != model[i].id || string(m.Body) != model[i].body {
					t.Fatalf("after op %d: message %d is %s %q, want %s %q", op, i, m.ID, m.Body, model[i].id, model[i].body)
				}
			}
			if c := o.Corrupted(); len(c) != 0 {
				t.Fatalf("corruption reported without damage: %+v", c)
			}
		}
	})
}
