package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fakeSystemctlOnPath puts a shell script named systemctl first on PATH.
func fakeSystemctlOnPath(t *testing.T, script string) {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "systemctl"), []byte("#!/bin/sh\n"+script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+":/usr/bin:/bin")
}

// runSystemctl runs the real program (a script standing in for systemctl,
// since the test host need not run systemd): what it prints, how it exits
// and a context that ends it.
func TestRunSystemctl(t *testing.T) {
	fakeSystemctlOnPath(t, `
case "$1" in
is-active) echo inactive; exit 3 ;;
stop) echo "Failed to stop $2: Access denied" >&2; exit 1 ;;
hang) exec sleep 30 ;;
stdin) cat; echo "read from stdin" ;;
*) echo " args: $* "; echo "a warning" >&2 ;;
esac
`)
	ctx := context.Background()
	if out, err := runSystemctl(ctx, "show", "--value", "x.service"); err != nil || out != "args: show --value x.service" {
		t.Fatalf("show: %q, %v", out, err)
	}
	out, err := runSystemctl(ctx, "is-active", "gwagent.service")
	if out != "inactive" || err == nil || !strings.Contains(err.Error(), "exit status 3") {
		t.Fatalf("is-active: %q, %v; want the output and the exit status", out, err)
	}
	_, err = runSystemctl(ctx, "stop", "gwagent.service")
	if err == nil || !strings.Contains(err.Error(), "systemctl stop gwagent.service: exit status 1: Failed to stop gwagent.service: Access denied") {
		t.Fatalf("stop: %v; want the command, the status and what systemctl said", err)
	}
	if out, err := runSystemctl(ctx, "stdin"); err != nil || out != "read from stdin" {
		t.Fatalf("stdin: %q, %v; want standard input empty, not inherited", out, err)
	}
	tctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = runSystemctl(tctx, "hang")
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 10*time.Second {
		t.Fatalf("hang: %v after %v; want it killed at the deadline", err, time.Since(start))
	}
}

// A systemctl in the working directory, reached through an empty or
// relative PATH entry, is not run.
func TestRunSystemctlNotFound(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "systemctl"), []byte("#!/bin/sh\necho ran\n"), 0o755)
	t.Chdir(dir)
	for _, path := range []string{"", ":", ".", "bin:" + filepath.Join(dir, "none")} {
		t.Setenv("PATH", path)
		out, err := runSystemctl(context.Background(), "status")
		if err == nil || out != "" || !strings.Contains(err.Error(), "not found in any directory of PATH") {
			t.Fatalf("PATH %q: %q, %v; want not found", path, out, err)
		}
	}
}
