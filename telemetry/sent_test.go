package telemetry_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/azsimtest"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/internal/clock"
)

// Delivered spool files leave the spool through sent/, which the pipeline
// empties; files a crash left in sent/ are removed at start and never sent
// again.
func TestSpoolSentSwept(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	spool := filepath.Join(t.TempDir(), "spool")
	sent := filepath.Join(spool, "sent")
	if err := os.MkdirAll(sent, 0o700); err != nil {
		t.Fatal(err)
	}
	// Left behind by a crash between the move and the sweep: delivered
	// already, so never sent again.
	if err := os.WriteFile(filepath.Join(sent, "old.json"), []byte(`{"left":1}`), 0o640); err != nil {
		t.Fatal(err)
	}
	r := newRig(t, rigOpts{spoolDir: spool})
	r.drain(hubSession(t, az, "gw-spool-sent"))
	for i := 0; i < 50; i++ {
		testenv.SpoolPut(t, spool, fmt.Sprintf("m%02d.json", i), []byte(fmt.Sprintf(`{"swept":%d}`, i)))
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
// directory, or as a directory of its own that others may write. The
// pipeline then uses neither: it deletes delivered files in place, says
// why, and touches nothing the link points at. An unusable sent/ is tried
// again after a minute: on the fake clock here, which the test moves.
func TestSpoolSentHostile(t *testing.T) {
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
				os.WriteFile(filepath.Join(sent, "keep.json"), []byte(`{}`), 0o600)
			}
			// An hour ahead of the wall clock: spool files are long settled.
			clk := clock.NewFake(time.Now().Add(time.Hour))
			r := newRig(t, rigOpts{clock: clk, spoolDir: spool})
			r.drain(hubSession(t, az, reg))
			for i := 0; i < 5; i++ {
				testenv.SpoolPut(t, spool, fmt.Sprintf("h%d.json", i), []byte(fmt.Sprintf(`{"hostile":%d}`, i)))
			}
			testenv.Eventually(t, 30*time.Second, "delivered and deleted in place", func() bool {
				ents, _ := os.ReadDir(spool)
				return len(bodiesWith(az, reg, "hostile")) == 5 && len(ents) == 1
			})
			if _, err := os.Stat(keep); err != nil {
				t.Fatalf("the pipeline touched the directory sent/ pointed at: %v", err)
			}
			ents, _ := os.ReadDir(victim)
			if len(ents) != 1 {
				t.Fatalf("files moved into the directory sent/ pointed at: %v", ents)
			}
			if kind == "open-dir" {
				if _, err := os.Stat(filepath.Join(sent, "keep.json")); err != nil {
					t.Fatalf("the pipeline emptied a sent/ it does not own: %v", err)
				}
			}
			if !strings.Contains(r.log.String(), "sent spool files are deleted in place") {
				t.Fatal("no warning about the unusable sent/ directory")
			}
			if kind != "symlink" {
				return
			}
			// Once the link is gone, sent/ is tried again a minute later
			// and the pipeline makes its own.
			os.Remove(sent)
			clk.Advance(time.Minute)
			for i := 5; i < 8; i++ {
				testenv.SpoolPut(t, spool, fmt.Sprintf("h%d.json", i), []byte(fmt.Sprintf(`{"hostile":%d}`, i)))
			}
			testenv.Eventually(t, 30*time.Second, "delivered through the pipeline's own sent/", func() bool {
				fi, err := os.Lstat(sent)
				ents, _ := os.ReadDir(sent)
				return len(bodiesWith(az, reg, "hostile")) == 8 && err == nil && fi.IsDir() && fi.Mode().Perm() == 0o700 && len(ents) == 0
			})
		})
	}
}

// The sent/ retry on the fake clock: an unusable sent/ is not tried again
// before a minute has passed (each delivered file is deleted in place
// meanwhile), and is at the minute.
func TestSpoolSentRetry(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	dir := t.TempDir()
	spool := filepath.Join(dir, "spool")
	os.MkdirAll(spool, 0o770)
	sent := filepath.Join(spool, "sent")
	os.WriteFile(sent, []byte("not a directory"), 0o600) // say, left by a confused application
	clk := clock.NewFake(time.Now().Add(time.Hour))
	r := newRig(t, rigOpts{clock: clk, spoolDir: spool})
	r.drain(hubSession(t, az, "gw-spool-sent-retry"))
	put := func(i int) {
		testenv.SpoolPut(t, spool, fmt.Sprintf("r%d.json", i), []byte(fmt.Sprintf(`{"retry":%d}`, i)))
		testenv.Eventually(t, 30*time.Second, fmt.Sprintf("message %d delivered and its file gone", i), func() bool {
			_, err := os.Lstat(filepath.Join(spool, fmt.Sprintf("r%d.json", i)))
			return len(bodiesWith(az, "gw-spool-sent-retry", "retry")) == i+1 && os.IsNotExist(err)
		})
	}
	put(0)
	os.Remove(sent)
	clk.Advance(time.Minute - time.Millisecond)
	put(1)
	if _, err := os.Lstat(sent); err == nil {
		t.Fatal("sent/ was tried again before a minute had passed")
	}
	clk.Advance(time.Millisecond)
	put(2)
	if fi, err := os.Lstat(sent); err != nil || !fi.IsDir() || fi.Mode().Perm() != 0o700 {
		t.Fatalf("sent/ not made again after a minute: %v", err)
	}
}
