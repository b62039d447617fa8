package telemetry

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
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
