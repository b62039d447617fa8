package telemetry_test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/telemetry"
	"github.com/gwagent/gwagent/telemetry/outbox"
)

// A file renamed into the spool is complete (README: write a temporary
// name, then rename): it is queued at once, even with an hour's settle
// time and a modification time of just now. A file created in place still
// waits the settle rule.
func TestSpoolRenamedInTakenAtOnce(t *testing.T) {
	r := newRig(t, rigOpts{settle: time.Hour, outbox: outbox.Options{WriteBehind: -1}})
	// A file that has long settled, queued by the first scan or by the
	// watcher: either way, the watcher is watching once it is queued.
	putSettled(t, r.spool, "old.json", []byte(`{"old":1}`))
	testenv.Eventually(t, 5*time.Second, "the settled file queued", func() bool { return r.depth() == 1 })

	inPlace := filepath.Join(r.spool, "inplace.json")
	if err := os.WriteFile(inPlace, []byte(`{"inPlace":1}`), 0o640); err != nil {
		t.Fatal(err)
	}
	testenv.SpoolPut(t, r.spool, "renamed.json", []byte(`{"renamed":1}`))
	testenv.Eventually(t, 5*time.Second, "the renamed-in file queued", func() bool { return r.depth() == 2 })
	// Another rename in, on the directory's own temporary name, and one
	// from another directory of the same file system.
	testenv.SpoolPut(t, r.spool, "renamed2.json", []byte(`{"renamed":2}`))
	other := filepath.Join(filepath.Dir(r.spool), "staged.json")
	os.WriteFile(other, []byte(`{"renamed":3}`), 0o640)
	if err := os.Rename(other, filepath.Join(r.spool, "renamed3.json")); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 5*time.Second, "every renamed-in file queued", func() bool { return r.depth() == 4 })
	time.Sleep(300 * time.Millisecond)
	if n := r.depth(); n != 4 {
		t.Fatalf("%d messages queued: the file created in place was taken before it settled", n)
	}
}

// Valid JSON nested deeper than the parser takes is refused with a reason
// that names the limit, not as "not valid JSON".
func TestSpoolJSONTooDeep(t *testing.T) {
	r := newRig(t, rigOpts{})
	deep := append(bytes.Repeat([]byte("["), 100_000), bytes.Repeat([]byte("]"), 100_000)...)
	testenv.SpoolPut(t, r.spool, "deep.json", deep)
	testenv.SpoolPut(t, r.spool, "broken.json", []byte(`{"a":`))
	testenv.Eventually(t, 10*time.Second, "both refused", func() bool { return r.p.Stats().SpoolRejected == 2 })
	for _, l := range strings.Split(r.log.String(), "\n") {
		switch {
		case strings.Contains(l, "/deep.json"):
			if !strings.Contains(l, "JSON nested deeper than 10000 levels") || strings.Contains(l, "not valid JSON") {
				t.Errorf("the deep file's reason: %s", l)
			}
		case strings.Contains(l, "/broken.json"):
			if !strings.Contains(l, "reason=\"not valid JSON\"") {
				t.Errorf("the broken file's reason: %s", l)
			}
		}
	}
}

// rejected/ is bounded: an application that rewrites the same broken
// file over and over leaves at most telemetry.RejectedKeep files there,
// the newest; the removed ones are counted and logged. Big refused files
// are bounded by bytes, but the newest is always kept.
func TestRejectedBounded(t *testing.T) {
	clk := clock.NewFake(time.Now().Add(time.Hour)) // files are long settled
	r := newRig(t, rigOpts{clock: clk, outbox: outbox.Options{WriteBehind: -1}})
	rejected := filepath.Join(r.spool, "rejected")
	n := telemetry.RejectedKeep + 30
	for i := range n {
		// The same name every time, as an application that keeps
		// rewriting its broken data.json.
		testenv.SpoolPut(t, r.spool, "data.json", []byte(fmt.Sprintf(`{"broken":%d`, i)))
		testenv.Eventually(t, 10*time.Second, "refused", func() bool { return r.p.Stats().SpoolRejected == int64(i+1) })
	}
	testenv.Eventually(t, 10*time.Second, "rejected/ bounded", func() bool {
		ents, _ := os.ReadDir(rejected)
		return len(ents) == telemetry.RejectedKeep && r.p.Stats().SpoolRejectedRemoved == int64(n-telemetry.RejectedKeep)
	})
	// The newest are kept: the last one written is there, the first is not.
	var contents []string
	ents, _ := os.ReadDir(rejected)
	for _, e := range ents {
		b, _ := os.ReadFile(filepath.Join(rejected, e.Name()))
		contents = append(contents, string(b))
	}
	sort.Strings(contents)
	joined := strings.Join(contents, "\n")
	if !strings.Contains(joined, fmt.Sprintf(`{"broken":%d`, n-1)) || strings.Contains(joined, `{"broken":0`+"\n") {
		t.Fatalf("rejected/ does not hold the newest files:\n%s", joined)
	}
	if !strings.Contains(r.log.String(), "removed the oldest") {
		t.Fatal("the removal is not logged")
	}
	if st, _ := os.Stat(rejected); st.Mode().Perm() != 0o750 {
		t.Fatalf("rejected/ has mode %v, want 0750 (applications may read, not write)", st.Mode())
	}

	// Big refused files: bounded by bytes, the newest always kept.
	big := bytes.Repeat([]byte("x"), telemetry.RejectedKeepBytes/2+1)
	before := r.p.Stats().SpoolRejected
	for i := range 3 {
		testenv.SpoolPut(t, r.spool, fmt.Sprintf("big%d.json", i), big)
		testenv.Eventually(t, 10*time.Second, "big file refused", func() bool { return r.p.Stats().SpoolRejected == before+int64(i+1) })
		clk.Advance(time.Millisecond)
		time.Sleep(20 * time.Millisecond) // distinct ctimes
	}
	testenv.Eventually(t, 10*time.Second, "rejected/ within its bytes", func() bool {
		var total int64
		names := map[string]bool{}
		ents, _ := os.ReadDir(rejected)
		for _, e := range ents {
			var st syscall.Stat_t
			syscall.Lstat(filepath.Join(rejected, e.Name()), &st)
			total += st.Blocks * 512
			names[e.Name()] = true
		}
		return names["big2.json"] && !names["big0.json"] && total <= telemetry.RejectedKeepBytes
	})
}

// A refused directory, with what an application put in it, is removed from
// rejected/ like a file once it is among the oldest; a symbolic link in it
// is removed, never followed.
func TestRejectedBoundedDirectory(t *testing.T) {
	clk := clock.NewFake(time.Now().Add(time.Hour))
	r := newRig(t, rigOpts{clock: clk, outbox: outbox.Options{WriteBehind: -1}})
	outside := filepath.Join(t.TempDir(), "precious")
	os.WriteFile(outside, []byte("keep me"), 0o600)
	d := filepath.Join(r.spool, "dir.json")
	os.MkdirAll(filepath.Join(d, "a", "b"), 0o770)
	os.WriteFile(filepath.Join(d, "a", "b", "f"), []byte("x"), 0o640)
	os.Symlink(filepath.Dir(outside), filepath.Join(d, "a", "link"))
	testenv.Eventually(t, 10*time.Second, "the directory refused", func() bool { return r.p.Stats().SpoolRejected == 1 })
	time.Sleep(20 * time.Millisecond)
	for i := range telemetry.RejectedKeep {
		testenv.SpoolPut(t, r.spool, fmt.Sprintf("b%03d.json", i), []byte("{"))
		testenv.Eventually(t, 10*time.Second, "refused", func() bool { return r.p.Stats().SpoolRejected == int64(i+2) })
	}
	testenv.Eventually(t, 10*time.Second, "the refused directory removed", func() bool {
		_, err := os.Lstat(filepath.Join(r.spool, "rejected", "dir.json"))
		return os.IsNotExist(err)
	})
	if b, err := os.ReadFile(outside); err != nil || string(b) != "keep me" {
		t.Fatalf("a file outside the spool was touched through a link: %v", err)
	}
}

// rejected/ made by someone else (an application before the agent) is not
// used: the refused file stays where it is, the warning says what to do,
// and nothing in that directory is deleted.
func TestRejectedNotOurs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("NEEDS ROOT: a rejected/ owned by another uid")
	}
	spool := filepath.Join(t.TempDir(), "spool")
	os.MkdirAll(filepath.Join(spool, "rejected"), 0o777)
	os.Chown(filepath.Join(spool, "rejected"), 61234, 61234)
	planted := filepath.Join(spool, "rejected", "planted")
	os.WriteFile(planted, nil, 0o644)
	r := newRig(t, rigOpts{spoolDir: spool})
	testenv.SpoolPut(t, r.spool, "bad.json", []byte("{"))
	testenv.Eventually(t, 10*time.Second, "refused", func() bool { return r.p.Stats().SpoolRejected == 1 })
	if _, err := os.Stat(filepath.Join(spool, "bad.json")); err != nil {
		t.Fatalf("the refused file was moved into a directory the agent does not own: %v", err)
	}
	if !strings.Contains(r.log.String(), "not by the agent; remove it") {
		t.Fatalf("the warning does not say what to do:\n%s", r.log.String())
	}
	if _, err := os.Stat(planted); err != nil {
		t.Fatal("a file in a directory the agent does not own was deleted")
	}
}

// The spool directory is removed and made again while the agent runs (an
// administrator's slip, tmpfiles.d applied again). The kernel says so at
// once (IN_DELETE_SELF) unless the agent holds the old directory open (the
// retirer does after removing files from it); then the rescan notices.
// Either way files in the new directory are queued, and the watch
// follows, so later files are seen at once again.
func TestSpoolDirMadeAgain(t *testing.T) {
	clk := clock.NewFake(time.Now())
	r := newRig(t, rigOpts{clock: clk, outbox: outbox.Options{WriteBehind: -1}})
	putSettled(t, r.spool, "before.json", []byte(`{"before":1}`))
	testenv.Eventually(t, 5*time.Second, "queued", func() bool { return r.depth() == 1 })
	if err := os.RemoveAll(r.spool); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(r.spool, 0o770); err != nil {
		t.Fatal(err)
	}
	testenv.SpoolPut(t, r.spool, "after.json", []byte(`{"after":1}`))
	clk.Advance(30 * time.Second) // the rescan
	testenv.Eventually(t, 10*time.Second, "a file in the new directory queued", func() bool { return r.depth() == 2 })
	// If the kernel's IN_DELETE_SELF was handled in the moment between the
	// removal and the mkdir, the directory is polled every 2 s until the
	// watch is back (what a real clock does by itself).
	testenv.Eventually(t, 10*time.Second, "the new directory watched", func() bool {
		if l := r.log.String(); strings.Contains(l, "made anew") || strings.Contains(l, "watching the spool directory with inotify again") {
			return true
		}
		clk.Advance(2 * time.Second)
		return false
	})
	testenv.SpoolPut(t, r.spool, "later.json", []byte(`{"later":1}`))
	testenv.Eventually(t, 5*time.Second, "a later file seen at once", func() bool { return r.depth() == 3 })
}

// putSettled puts a spool file written long ago (its modification time two
// hours back), which any look at the directory takes at once.
func putSettled(t *testing.T, dir, name string, body []byte) {
	t.Helper()
	tmp := filepath.Join(dir, "."+name+".tmp")
	if err := os.WriteFile(tmp, body, 0o640); err != nil {
		t.Fatal(err)
	}
	past := time.Now().Add(-2 * time.Hour)
	os.Chtimes(tmp, past, past)
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		t.Fatal(err)
	}
}
