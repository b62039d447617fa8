package atomicfile

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// The full-disk fallback: shorter content is padded with spaces so no old
// byte remains; content beyond the file's allocated blocks and links are
// refused.
func TestOverwriteInPlace(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "epoch")
	os.WriteFile(p, []byte("123456\n"), 0o600)
	if err := OverwriteInPlace(p, []byte("7\n")); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); string(b) != "7\n     " {
		t.Fatalf("content %q", b)
	}
	if err := OverwriteInPlace(p, []byte("1234567890\n")); err != nil {
		t.Fatalf("a longer content within the file's block: %v", err)
	}
	if b, _ := os.ReadFile(p); string(b) != "1234567890\n" {
		t.Fatalf("content %q", b)
	}
	var st syscall.Stat_t
	syscall.Stat(p, &st)
	if err := OverwriteInPlace(p, bytes.Repeat([]byte("x"), int(st.Blocks*512)+1)); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("content beyond the allocated blocks: %v, want ENOSPC", err)
	}
	l := filepath.Join(dir, "link")
	os.Symlink(p, l)
	if err := OverwriteInPlace(l, []byte("1\n")); err == nil {
		t.Fatal("a symbolic link was followed")
	}
}
