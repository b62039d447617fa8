package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// runSystemctl runs systemctl with args until it exits or ctx ends, and
// returns its standard output, trimmed. It returns the output even when
// systemctl exits non-zero (is-active prints "inactive" and exits 3), with an
// error that names the command, how it ended and what systemctl wrote to
// standard error.
//
// systemctl is the only program gwagent starts, from `gwagent check` and the
// station commands. os.StartProcess does it with less of the binary than
// os/exec (about 80 KiB of stripped arm64, issue 22's own-code figure).
func runSystemctl(ctx context.Context, args ...string) (string, error) {
	name := "systemctl " + strings.Join(args, " ")
	path, err := findOnPath("systemctl")
	if err != nil {
		return "", fmt.Errorf("%s: %w", name, err)
	}
	null, err := os.Open(os.DevNull)
	if err != nil {
		return "", fmt.Errorf("%s: %w", name, err)
	}
	defer null.Close()
	outR, outW, err := os.Pipe()
	if err != nil {
		return "", fmt.Errorf("%s: %w", name, err)
	}
	defer outR.Close()
	errR, errW, err := os.Pipe()
	if err != nil {
		outW.Close()
		return "", fmt.Errorf("%s: %w", name, err)
	}
	defer errR.Close()
	p, err := os.StartProcess(path, append([]string{"systemctl"}, args...), &os.ProcAttr{Files: []*os.File{null, outW, errW}})
	outW.Close()
	errW.Close()
	if err != nil {
		return "", fmt.Errorf("%s: %w", name, err)
	}
	// At the deadline: kill systemctl, and stop reading what a child it
	// left behind may still hold open.
	stop := context.AfterFunc(ctx, func() {
		p.Kill()
		outR.Close()
		errR.Close()
	})
	var stderr []byte
	read := make(chan struct{})
	go func() {
		stderr, _ = io.ReadAll(errR)
		close(read)
	}()
	stdout, _ := io.ReadAll(outR)
	<-read
	st, err := p.Wait()
	stop()
	out := strings.TrimSpace(string(stdout))
	switch {
	case err != nil:
		return out, fmt.Errorf("%s: %w", name, err)
	case ctx.Err() != nil && !st.Success():
		return out, fmt.Errorf("%s: %w", name, context.Cause(ctx))
	case !st.Success():
		if msg := strings.TrimSpace(string(stderr)); msg != "" {
			return out, fmt.Errorf("%s: %s: %s", name, st, msg)
		}
		return out, fmt.Errorf("%s: %s", name, st)
	}
	return out, nil
}

// findOnPath is the executable file's path in the first absolute directory
// of PATH that has one. Relative entries (and empty ones, which mean the
// working directory) are skipped: a command run as root must not pick up a
// systemctl from wherever it was started.
func findOnPath(file string) (string, error) {
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		if !filepath.IsAbs(dir) {
			continue
		}
		p := filepath.Join(dir, file)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0 {
			return p, nil
		}
	}
	return "", errors.New("not found in any directory of PATH; is this a systemd host?")
}
