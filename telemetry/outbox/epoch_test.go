package outbox

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/devtools/testenv"
)

// An empty outbox whose epoch file is damaged in every way a power cut, a
// bad flash block or a careless hand can damage it: no message id is ever
// handed out twice. (Before, numbering restarted at epoch 1 under the same
// id, so $.mid values carried two different bodies.) Where the epoch
// cannot be trusted the outbox takes a new id and says why; a good epoch
// file, the older format without a checksum included, keeps the id.
func TestOutboxIDsAfterDamagedEpoch(t *testing.T) {
	for _, c := range []struct {
		name    string
		damage  func(t *testing.T, p string)
		renewed bool
	}{
		{"ok/untouched", func(t *testing.T, p string) {}, false},
		{"ok/older-format-without-checksum", func(t *testing.T, p string) {
			b, _ := os.ReadFile(p)
			os.WriteFile(p, []byte(strings.Fields(string(b))[0]+"\n"), 0o600)
		}, false},
		{"fail/deleted", func(t *testing.T, p string) { os.Remove(p) }, true},
		{"fail/garbage", func(t *testing.T, p string) { os.WriteFile(p, []byte("\x8f\x02garbage"), 0o600) }, true},
		{"fail/zeroed", func(t *testing.T, p string) {
			b, _ := os.ReadFile(p)
			os.WriteFile(p, make([]byte, len(b)), 0o600)
		}, true},
		{"fail/empty", func(t *testing.T, p string) { os.WriteFile(p, nil, 0o600) }, true},
		{"fail/zero", func(t *testing.T, p string) { os.WriteFile(p, []byte("0\n"), 0o600) }, true},
		{"fail/a-digit-flipped", func(t *testing.T, p string) {
			// A smaller number that still parses: only the checksum
			// tells it from a good file.
			b, _ := os.ReadFile(p)
			b[0]--
			os.WriteFile(p, b, 0o600)
		}, true},
		{"fail/torn-in-place-write", func(t *testing.T, p string) {
			// A power cut during the in-place write a full disk forces:
			// the new number's first bytes over the old line.
			b, _ := os.ReadFile(p)
			torn := append(epochLine(999)[:3], b[3:]...)
			os.WriteFile(p, torn, 0o600)
		}, true},
		{"fail/symlink", func(t *testing.T, p string) {
			os.Remove(p)
			os.Symlink("/dev/zero", p)
		}, true},
		{"fail/directory", func(t *testing.T, p string) {
			os.Remove(p)
			os.Mkdir(p, 0o700)
		}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			seen := map[string]string{} // id → body
			take := func(o *Outbox, round int) {
				t.Helper()
				for i := range 5 {
					body := []byte{byte('a' + round), byte('0' + i)}
					m := &Message{Kind: KindHealth, Body: body}
					if _, err := o.Put(m); err != nil {
						t.Fatal(err)
					}
					if prev, ok := seen[m.ID]; ok {
						t.Fatalf("message id %s carried %q and now %q", m.ID, prev, body)
					}
					seen[m.ID] = string(body)
					if err := o.Ack(m.Seq); err != nil {
						t.Fatal(err)
					}
				}
			}
			var id string
			for round := range 3 {
				// Acked within the write-behind time: nothing of them
				// reaches the disk, the outbox is empty.
				o, err := Open(dir, Options{})
				if err != nil {
					t.Fatal(err)
				}
				id = o.ID()
				take(o, round)
				o.Close()
			}
			c.damage(t, filepath.Join(dir, "epoch"))
			o, err := Open(dir, Options{})
			if err != nil {
				// A directory in its place cannot be replaced by a file:
				// that must not stop the agent either.
				t.Fatalf("open after the damage: %v", err)
			}
			defer o.Close()
			take(o, 3)
			if renewed := o.ID() != id; renewed != c.renewed {
				t.Fatalf("id renewed: %v, want %v (%q)", renewed, c.renewed, o.IDRenewed())
			}
			if c.renewed && !strings.Contains(o.IDRenewed(), "epoch") {
				t.Fatalf("IDRenewed() = %q, want why", o.IDRenewed())
			}
			o.Close()
			// And the next open is back to normal: same id, newer epoch.
			o2 := openT(t, dir, Options{})
			if o2.ID() != o.ID() || o2.IDRenewed() != "" {
				t.Fatalf("the id changed again after a clean close: %s → %s (%q)", o.ID(), o2.ID(), o2.IDRenewed())
			}
			take(o2, 4)
		})
	}
}

// A damaged id file (zeroed, garbage) is replaced by a new id, never used
// as a prefix of message ids.
func TestOutboxDamagedID(t *testing.T) {
	dir := t.TempDir()
	o := openT(t, dir, Options{})
	o.Close()
	os.WriteFile(filepath.Join(dir, "id"), make([]byte, 13), 0o600)
	o = openT(t, dir, Options{})
	m := &Message{Kind: KindHealth, Body: []byte("h")}
	o.Put(m)
	if !validID(o.ID()) || strings.ContainsRune(m.ID, 0) {
		t.Fatalf("a zeroed id file gave the id %q", m.ID)
	}
}

// A brand-new outbox on a full disk (a real tmpfs without a free block)
// opens: it runs from memory and says why (Unsaved). Messages that need no
// disk are queued; one that must be written fails with ENOSPC. Once there
// is room, the first write saves the id and epoch before any record, so
// the records written name the id that is on disk, and the next open
// numbers above them.
func TestOutboxOpensOnFullDisk(t *testing.T) {
	mnt := filepath.Join(t.TempDir(), "fs")
	testenv.Tmpfs(t, mnt, "size=256k,nr_inodes=64")
	dir := filepath.Join(mnt, "state", "outbox")
	os.Mkdir(filepath.Join(mnt, "state"), 0o700)
	free := testenv.Fill(t, mnt, true) // no block, no inode
	o, err := Open(dir, Options{WriteBehind: time.Hour})
	if err != nil {
		t.Fatalf("a new outbox does not open on a full disk: %v", err)
	}
	defer o.Close()
	if err := o.Unsaved(); err == nil || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("Unsaved() = %v, want ENOSPC", err)
	}
	h := &Message{Kind: KindHealth, Body: []byte(`{"h":1}`)}
	if _, err := o.Put(h); err != nil {
		t.Fatalf("a health message on a full disk: %v", err)
	}
	if _, err := o.Put(&Message{Kind: KindApp, Body: []byte(`{"durable":1}`)}); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("a message that must be written, on a full disk: %v, want ENOSPC", err)
	}
	free()
	d := &Message{Kind: KindApp, Body: []byte(`{"durable":2}`)}
	if _, err := o.Put(d); err != nil {
		t.Fatalf("Put once there is room: %v", err)
	}
	if o.Unsaved() != nil {
		t.Fatalf("still unsaved after a write: %v", o.Unsaved())
	}
	id := o.ID()
	o.Close()
	o2 := openT(t, dir, Options{})
	if o2.ID() != id {
		t.Fatalf("the id on disk is %s, the records were written under %s", o2.ID(), id)
	}
	var got []string
	for _, m := range mustNext(t, o2) {
		got = append(got, m.ID+"="+string(m.Body))
	}
	want := []string{h.ID + `={"h":1}`, d.ID + `={"durable":2}`}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("after reopening: %v, want %v", got, want)
	}
	n := &Message{Kind: KindHealth, Body: []byte("n")}
	o2.Put(n)
	if epochOf(t, n.ID) <= epochOf(t, d.ID) {
		t.Fatalf("id %s after reopening is not of a newer epoch than %s", n.ID, d.ID)
	}
	if !bytes.HasPrefix([]byte(n.ID), []byte(id+"-")) {
		t.Fatalf("id %s is not under the outbox id %s", n.ID, id)
	}
}
