package telemetry

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/condition"
	"github.com/gwagent/gwagent/internal/dirwatch"
	"github.com/gwagent/gwagent/telemetry/outbox"
)

// The spool's size limit is the one README.md states.
func TestSpoolLimitAsDocumented(t *testing.T) {
	if got := maxSpoolBody(); got != 262080 {
		t.Fatalf("maxSpoolBody() = %d; README.md says 262,080 bytes", got)
	}
}

// Refused files go to rejected/ without replacing one there, and never
// through a link an application put in place of rejected/.
func TestMoveAside(t *testing.T) {
	dir := t.TempDir()
	now := time.Unix(1_700_000_000, 0)
	for i := range 2 {
		os.WriteFile(filepath.Join(dir, "x.json"), []byte{byte('0' + i)}, 0o640)
		if _, err := moveAside(dir, "x.json", now); err != nil {
			t.Fatal(err)
		}
	}
	ents, _ := os.ReadDir(filepath.Join(dir, "rejected"))
	if len(ents) != 2 {
		t.Fatalf("rejected/ holds %d files, want both refused files", len(ents))
	}
	// A rejected/ of an older version, writable by the spool group, is
	// brought to the agent's own mode.
	legacy := t.TempDir()
	os.Mkdir(filepath.Join(legacy, "rejected"), 0o770)
	os.Chmod(filepath.Join(legacy, "rejected"), os.ModeSetgid|0o770)
	os.WriteFile(filepath.Join(legacy, "y.json"), []byte("{"), 0o640)
	if _, err := moveAside(legacy, "y.json", now); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(filepath.Join(legacy, "rejected")); st.Mode()&(os.ModePerm|os.ModeSetgid|os.ModeSticky) != rejectedMode {
		t.Fatalf("an older rejected/ kept mode %v, want %04o", st.Mode(), rejectedMode)
	}

	evil := t.TempDir()
	outside := t.TempDir() // e.g. the state directory
	os.Symlink(outside, filepath.Join(evil, "rejected"))
	os.WriteFile(filepath.Join(evil, "status.json"), []byte("x"), 0o640)
	if _, err := moveAside(evil, "status.json", now); err == nil {
		t.Fatal("moved a file through a symbolic link")
	}
	if ents, _ := os.ReadDir(outside); len(ents) != 0 {
		t.Fatalf("a refused file landed outside the spool: %v", ents[0].Name())
	}
	if _, err := os.Stat(filepath.Join(evil, "status.json")); err != nil {
		t.Fatalf("the refused file is gone: %v", err)
	}
}

// maxJSONDepth is the nesting encoding/json takes, so the reason a refused
// file gets names the limit it really hit.
func TestJSONDepthLimit(t *testing.T) {
	nest := func(n int) []byte {
		return append(bytes.Repeat([]byte("["), n), bytes.Repeat([]byte("]"), n)...)
	}
	if !json.Valid(nest(maxJSONDepth)) || json.Valid(nest(maxJSONDepth+1)) {
		t.Fatalf("encoding/json no longer takes exactly %d levels: change maxJSONDepth", maxJSONDepth)
	}
	for _, c := range []struct {
		doc  string
		deep bool
	}{
		{string(nest(maxJSONDepth)), false},
		{string(nest(maxJSONDepth + 1)), true},
		{`{"a":"` + strings.Repeat("[", maxJSONDepth+5) + `"}`, false}, // brackets in a string
		{`["\"` + strings.Repeat("{", maxJSONDepth+5) + `"]`, false},   // after an escaped quote
	} {
		if got := jsonDeeperThan([]byte(c.doc), maxJSONDepth); got != c.deep {
			t.Errorf("jsonDeeperThan(%.20q...) = %v, want %v", c.doc, got, c.deep)
		}
	}
}

// The rescan skips the spool files already queued (their lstat was most of
// its CPU with a large backlog); the full scan looks at every file. A
// queued version that is not the file in place stands for a replacement no
// event reported: the rescan leaves it to the retirer, the scan queues it.
func TestRescanSkipsQueuedFiles(t *testing.T) {
	spool := filepath.Join(t.TempDir(), "spool")
	p, err := Open(Options{StateDir: t.TempDir(), Sink: nopSink{}, Outbox: outbox.Options{WriteBehind: -1},
		Spool: func() Spool { return Spool{Dir: spool, Settle: time.Second} }})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := os.MkdirAll(spool, 0o700); err != nil {
		t.Fatal(err)
	}
	s := &spooler{p: p, dir: spool, pending: map[string]pendingFile{}, refused: map[string]dirwatch.Sig{}}
	queued, fresh := filepath.Join(spool, "queued.json"), filepath.Join(spool, "fresh.json")
	for _, f := range []string{queued, fresh} {
		if err := os.WriteFile(f, []byte(`{"a":1}`), 0o640); err != nil {
			t.Fatal(err)
		}
		old := time.Now().Add(-time.Hour) // settled
		os.Chtimes(f, old, old)
	}
	p.queued.sigs[queued] = dirwatch.Sig{Size: 1} // not the file in place
	s.rescan()
	if d := p.Stats().OutboxDepth; d != 1 {
		t.Fatalf("after the rescan the outbox holds %d messages, want 1 (fresh.json, not the queued file)", d)
	}
	s.scan()
	if d := p.Stats().OutboxDepth; d != 2 {
		t.Fatalf("after the full scan the outbox holds %d messages, want 2 (the queued file's new version too)", d)
	}
}

type nopSink struct{}

func (nopSink) Raise(condition.Name, string) {}
func (nopSink) Clear(condition.Name)         {}
func (nopSink) Has(condition.Name) bool      { return false }
