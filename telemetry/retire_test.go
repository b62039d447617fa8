package telemetry_test

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/azsimtest"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/telemetry/outbox"
)

// Delivered spool files leave the spool; a sent/ an older version left
// (its files were delivered) is emptied and removed at start, and what was
// in it is never sent.
func TestSpoolDeliveredRemoved(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	spool := filepath.Join(t.TempDir(), "spool")
	sent := filepath.Join(spool, "sent")
	if err := os.MkdirAll(sent, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(sent, "old.json"), []byte(`{"left":1}`), 0o640); err != nil {
		t.Fatal(err)
	}
	r := newRig(t, rigOpts{spoolDir: spool})
	r.drain(hubSession(t, az, "gw-spool-retire"))
	for i := 0; i < 200; i++ {
		testenv.SpoolPut(t, spool, fmt.Sprintf("m%03d.json", i), []byte(fmt.Sprintf(`{"retired":%d}`, i)))
	}
	testenv.Eventually(t, 30*time.Second, "all delivered once, the spool empty, the old sent/ gone", func() bool {
		ents, _ := os.ReadDir(spool)
		_, err := os.Lstat(sent)
		return len(bodiesWith(az, "gw-spool-retire", "retired")) >= 200 && len(ents) == 0 && os.IsNotExist(err)
	})
	if n := len(bodiesWith(az, "gw-spool-retire", "retired")); n != 200 {
		t.Fatalf("%d messages for 200 files", n)
	}
	if n := len(bodiesWith(az, "gw-spool-retire", "left")); n != 0 {
		t.Fatalf("a file an older version left in sent/ was sent %d times", n)
	}
}

// A sent/ the agent did not make (a link, or a directory others may
// write: a member of the spool group may have made it) is left alone, and
// nothing it points at is touched.
func TestSpoolOldSentHostile(t *testing.T) {
	for _, kind := range []string{"symlink", "open-dir"} {
		t.Run(kind, func(t *testing.T) {
			az := azsimtest.Start(t, azsim.Config{})
			reg := "gw-spool-sent-" + kind
			dir := t.TempDir()
			spool := filepath.Join(dir, "spool")
			os.MkdirAll(spool, 0o770)
			victim := filepath.Join(dir, "victim")
			os.MkdirAll(victim, 0o700)
			keep := filepath.Join(victim, "keep.json")
			os.WriteFile(keep, []byte(`{}`), 0o600)
			sent := filepath.Join(spool, "sent")
			switch kind {
			case "symlink":
				if err := os.Symlink(victim, sent); err != nil {
					t.Fatal(err)
				}
			case "open-dir":
				os.Mkdir(sent, 0o777)
				os.Chmod(sent, 0o777)
				keep = filepath.Join(sent, "keep.json")
				os.WriteFile(keep, []byte(`{}`), 0o600)
			}
			r := newRig(t, rigOpts{spoolDir: spool})
			r.drain(hubSession(t, az, reg))
			for i := 0; i < 5; i++ {
				testenv.SpoolPut(t, spool, fmt.Sprintf("h%d.json", i), []byte(fmt.Sprintf(`{"hostile":%d}`, i)))
			}
			testenv.Eventually(t, 30*time.Second, "delivered and deleted", func() bool {
				ents, _ := os.ReadDir(spool)
				return len(bodiesWith(az, reg, "hostile")) == 5 && len(ents) == 1
			})
			if _, err := os.Stat(keep); err != nil {
				t.Fatalf("the pipeline touched a sent/ it did not make: %v", err)
			}
			if _, err := os.Lstat(sent); err != nil {
				t.Fatalf("the pipeline removed a sent/ it did not make: %v", err)
			}
		})
	}
}

// The crash guarantee of trailing retirement: receipts written before a
// crash (here: an outbox closed with receipts whose files were never
// removed, as a SIGKILL leaves it) make the next start remove those files
// without sending them, while a file written anew under a delivered name
// since (another version) is a new message and is sent. TestCrash* in
// cmd/gwagent kill the real agent.
func TestSpoolReceiptsAfterCrash(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	state := t.TempDir()
	spool := filepath.Join(t.TempDir(), "spool")
	os.MkdirAll(spool, 0o770)
	var rs []outbox.Receipt
	for i := 0; i < 100; i++ {
		p := filepath.Join(spool, fmt.Sprintf("d%03d.json", i))
		testenv.SpoolPut(t, spool, filepath.Base(p), []byte(fmt.Sprintf(`{"delivered":%d}`, i)))
		var st syscall.Stat_t
		if err := syscall.Lstat(p, &st); err != nil {
			t.Fatal(err)
		}
		rs = append(rs, outbox.Receipt{Path: p, ID: outbox.FileID{Dev: uint64(st.Dev), Ino: st.Ino, Size: st.Size, Mtime: st.Mtim.Nano()}})
	}
	o, err := outbox.Open(filepath.Join(state, "outbox"), outbox.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := o.Deliver(nil, rs, false); err != nil {
		t.Fatal(err)
	}
	o.Close()
	// One delivered name written anew: a new version, a new message.
	renewed := filepath.Join(spool, "d007.json")
	os.Remove(renewed)
	testenv.SpoolPut(t, spool, "d007.json", []byte(`{"renewed":7}`))

	r := newRig(t, rigOpts{stateDir: state, spoolDir: spool})
	r.drain(hubSession(t, az, "gw-receipts"))
	testenv.Eventually(t, 30*time.Second, "the delivered files removed, the new version sent", func() bool {
		ents, _ := os.ReadDir(spool)
		return len(ents) == 0 && len(bodiesWith(az, "gw-receipts", "renewed")) == 1
	})
	time.Sleep(500 * time.Millisecond)
	if n := len(bodiesWith(az, "gw-receipts", "delivered")); n != 0 {
		t.Fatalf("%d files recorded as delivered were sent again", n)
	}
	r.stop()
	// Their receipts are retired: the outbox holds nothing of them.
	o, err = outbox.Open(filepath.Join(state, "outbox"), outbox.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	if n := len(o.Receipts()); n > 0 {
		// The active segment may keep retired receipts until it is
		// full: they must then find nothing to remove.
		t.Logf("%d retired receipts still in the active segment", n)
	}
}
