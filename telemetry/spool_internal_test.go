package telemetry

import (
	"os"
	"path/filepath"
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
