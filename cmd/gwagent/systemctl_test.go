package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fakeSystemctlOnPath puts a shell script named systemctl first on PATH.
func fakeSystemctlOnPath(t *testing.T, script string) {
	t.Helper()
	dir := t.TempDir()
	t.Cleanup(func() { // the children the script recorded, which outlive it
		b, _ := os.ReadFile(filepath.Join(dir, "systemctl.pids"))
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
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
fork) sleep 5 & echo $! >>"$0.pids"; sleep 5 & echo $! >>"$0.pids"; wait ;;
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
	for _, arg := range []string{"hang", "fork"} { // fork: a child keeps the output open
		tctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		start := time.Now()
		_, err = runSystemctl(tctx, arg)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 2*time.Second {
			t.Fatalf("%s: %v after %v; want it ended at the deadline", arg, err, time.Since(start))
		}
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
