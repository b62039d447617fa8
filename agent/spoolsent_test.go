package agent_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
)

// Delivered spool files leave the spool through sent/, which the agent
// empties; files a crash left in sent/ are removed at start and never sent
// again.
func TestSpoolSentSwept(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	d := newDevice(t, az, devOpts{regID: "gw-spool-sent", symmetric: true})
	spool := d.cfg.Telemetry.SpoolDir
	sent := filepath.Join(spool, "sent")
	if err := os.MkdirAll(sent, 0o700); err != nil {
		t.Fatal(err)
	}
	// Left behind by a crash between the move and the sweep: delivered
	// already, so never sent again.
	if err := os.WriteFile(filepath.Join(sent, "old.json"), []byte(`{"left":1}`), 0o640); err != nil {
		t.Fatal(err)
	}
	d.start()
	for i := 0; i < 50; i++ {
		spoolPut(t, spool, fmt.Sprintf("m%02d.json", i), []byte(fmt.Sprintf(`{"swept":%d}`, i)))
	}
	testenv.Eventually(t, 30*time.Second, "all delivered, the spool and sent/ empty", func() bool {
		a, _ := os.ReadDir(spool)
		b, _ := os.ReadDir(sent)
		return len(bodiesWith(az, "gw-spool-sent", "swept")) == 50 && len(a) == 1 && len(b) == 0
	})
	if n := len(bodiesWith(az, "gw-spool-sent", "left")); n != 0 {
		t.Fatalf("a file left in sent/ was sent %d times", n)
	}
	if fi, err := os.Lstat(sent); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("sent/ should stay the agent's own (0700): %v %v", fi.Mode(), err)
	}
}

// A member of the spool group can make sent/ first: as a link to another
// directory, or as a directory of its own that others may write. The agent
// then uses neither: it deletes delivered files in place, says why, and
// touches nothing the link points at.
func TestSpoolSentHostile(t *testing.T) {
	for _, kind := range []string{"symlink", "open-dir"} {
		t.Run(kind, func(t *testing.T) {
			az := azsimtest.Start(t, azsim.Config{})
			reg := "gw-spool-sent-" + kind
			d := newDevice(t, az, devOpts{regID: reg, symmetric: true})
			spool := d.cfg.Telemetry.SpoolDir
			os.MkdirAll(spool, 0o770)
			victim := filepath.Join(d.dir, "victim")
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
				os.WriteFile(filepath.Join(sent, "keep.json"), []byte(`{}`), 0o600)
			}
			r := d.start()
			for i := 0; i < 5; i++ {
				spoolPut(t, spool, fmt.Sprintf("h%d.json", i), []byte(fmt.Sprintf(`{"hostile":%d}`, i)))
			}
			testenv.Eventually(t, 30*time.Second, "delivered and deleted in place", func() bool {
				ents, _ := os.ReadDir(spool)
				return len(bodiesWith(az, reg, "hostile")) == 5 && len(ents) == 1
			})
			if _, err := os.Stat(keep); err != nil {
				t.Fatalf("the agent touched the directory sent/ pointed at: %v", err)
			}
			ents, _ := os.ReadDir(victim)
			if len(ents) != 1 {
				t.Fatalf("files moved into the directory sent/ pointed at: %v", ents)
			}
			if kind == "open-dir" {
				if _, err := os.Stat(filepath.Join(sent, "keep.json")); err != nil {
					t.Fatalf("the agent emptied a sent/ it does not own: %v", err)
				}
			}
			if !strings.Contains(r.log.String(), "sent spool files are deleted in place") {
				t.Fatal("no warning about the unusable sent/ directory")
			}
			if kind != "symlink" {
				return
			}
			// Once the link is gone, sent/ is tried again (after a minute;
			// here at once) and the agent makes its own.
			os.Remove(sent)
			r.a.RetrySentNow()
			for i := 5; i < 8; i++ {
				spoolPut(t, spool, fmt.Sprintf("h%d.json", i), []byte(fmt.Sprintf(`{"hostile":%d}`, i)))
			}
			testenv.Eventually(t, 30*time.Second, "delivered through the agent's own sent/", func() bool {
				fi, err := os.Lstat(sent)
				ents, _ := os.ReadDir(sent)
				return len(bodiesWith(az, reg, "hostile")) == 8 && err == nil && fi.IsDir() && fi.Mode().Perm() == 0o700 && len(ents) == 0
			})
		})
	}
}
