package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/internal/statelock"
	"github.com/gwagent/gwagent/keystore"
)

// The commands that change the device's state (onboard csr and install,
// provision, renew without a running agent) need the state directory to
// themselves. At the factory station they run as root on a booted image
// whose enabled service already holds it: holdState stops that service for
// the command and starts it again afterwards (which also makes it use what
// the command installed at once, instead of after its backoff). Whatever
// the command created as root in the state directory is handed to the
// directory's owner, the service user, before the service starts again.

// stationMarker, in the state directory, names the service a command
// stopped. A command killed before it could start the service again leaves
// it; the next such command starts the service at its end.
const stationMarker = "station-stopped-service"

// isUnitName reports whether s is what holdState accepts as a systemd
// service name: [A-Za-z0-9:_.@-]+ followed by ".service". A loop, not a
// regular expression: package regexp would add 0.1 MiB to the binary for
// this one check.
func isUnitName(s string) bool {
	stem, ok := strings.CutSuffix(s, ".service")
	if !ok || stem == "" {
		return false
	}
	for _, c := range []byte(stem) {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', strings.IndexByte(":_.@-", c) >= 0:
		default:
			return false
		}
	}
	return true
}

// host is the outside world of holdState, so tests need no systemd.
type host struct {
	// unitOf names the systemd service pid runs in, "" if none.
	unitOf func(pid int) string
	// mainPID is the service's main process, 0 if none.
	mainPID func(ctx context.Context, unit string) int
	// systemctl runs systemctl with args.
	systemctl func(ctx context.Context, args ...string) error
	euid      func() int
}

var realHost = host{unitOf: serviceOfPID, mainPID: serviceMainPID, systemctl: systemctlRun, euid: os.Geteuid}

// stateHold is a command's hold on the state directory.
type stateHold struct {
	lock   *statelock.Lock
	dir    string
	unit   string // the service to start at the end, "" if none
	stderr io.Writer
	h      host
}

// holdState takes the state directory, stopping the service that holds it
// if it is a systemd service and the caller is root. Callers defer release.
func holdState(ctx context.Context, dir string, stderr io.Writer, h host) (*stateHold, error) {
	pending := readMarker(dir)
	lock, err := statelock.Take(dir)
	if err == nil {
		if pending != "" {
			fmt.Fprintf(stderr, "a gwagent command that stopped %s did not start it again; it is started after this one\n", pending)
		}
		return &stateHold{lock: lock, dir: dir, unit: pending, stderr: stderr, h: h}, nil
	}
	if !errors.Is(err, statelock.ErrAlreadyRunning) {
		return nil, err
	}
	pid, perr := statelock.Holder(dir)
	unit := ""
	if perr == nil && pid > 0 {
		unit = h.unitOf(pid)
	}
	// Only the service's own agent: a `gwagent run` started by hand from a
	// shell that runs in some service (a CI job, say) is not that service.
	if unit != "" && h.mainPID(ctx, unit) != pid {
		unit = ""
	}
	if unit == "" {
		return nil, err // a `gwagent run` by hand: the operator stops it
	}
	if h.euid() != 0 {
		return nil, fmt.Errorf("%w; it is the service %s: run this command as root (it stops %s and starts it again afterwards), or `systemctl stop %s` first", err, unit, unit, unit)
	}
	if err := writeMarker(dir, unit); err != nil {
		return nil, fmt.Errorf("state directory %s: %w", dir, err)
	}
	fmt.Fprintf(stderr, "stopping %s for this command; it is started again afterwards\n", unit)
	if err := h.systemctl(ctx, "stop", unit); err != nil {
		os.Remove(filepath.Join(dir, stationMarker))
		return nil, fmt.Errorf("stop %s: %w", unit, err)
	}
	lock, err = statelock.Take(dir)
	if err != nil {
		hold := &stateHold{dir: dir, unit: unit, stderr: stderr, h: h}
		hold.release(ctx)
		return nil, err
	}
	return &stateHold{lock: lock, dir: dir, unit: unit, stderr: stderr, h: h}, nil
}

// release hands what the command created to the service user, lets go of
// the state directory and starts the service it stopped. It runs when the
// command failed or was interrupted too.
func (s *stateHold) release(ctx context.Context, keyURIs ...string) {
	if s == nil {
		return
	}
	if s.h.euid() == 0 {
		if err := handOver(s.dir, keyPaths(keyURIs)...); err != nil {
			fmt.Fprintf(s.stderr, "warning: %v; run `chown -R` to the service user on the state directory, or `gwagent check` to see what is wrong\n", err)
		}
	}
	s.lock.Unlock()
	if s.unit == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
	defer cancel()
	if err := s.h.systemctl(ctx, "start", s.unit); err != nil {
		fmt.Fprintf(s.stderr, "error: could not start %s again: %v; run `systemctl start %s`\n", s.unit, err, s.unit)
		return
	}
	os.Remove(filepath.Join(s.dir, stationMarker))
	fmt.Fprintf(s.stderr, "started %s again\n", s.unit)
}

func readMarker(dir string) string {
	b, err := os.ReadFile(filepath.Join(dir, stationMarker))
	if err != nil {
		return ""
	}
	if u := strings.TrimSpace(string(b)); isUnitName(u) {
		return u
	}
	return ""
}

func writeMarker(dir, unit string) error {
	return atomicfile.Write(filepath.Join(dir, stationMarker), []byte(unit+"\n"), 0o644)
}

// keyPaths are the files a key URI keeps outside a token: a file key, a
// TPM key's blob.
func keyPaths(uris []string) []string {
	var out []string
	for _, raw := range uris {
		u, err := keystore.Parse(raw)
		if err != nil {
			continue
		}
		if u.Path != "" {
			out = append(out, u.Path)
		}
		if b := u.Attrs["blob"]; b != "" {
			out = append(out, b)
		}
		if alt, err := u.Alternate(); err == nil {
			out = append(out, alt.Path, alt.Attrs["blob"])
		}
	}
	return out
}

// handOver gives root-owned files and directories in dir, and the files in
// extra, to dir's owner (the service user): a command run as root must not
// leave state the service cannot read or replace. Files of other users
// (messages moved in from the spool) are left alone; so is everything when
// dir itself belongs to root.
func handOver(dir string, extra ...string) error {
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		return fmt.Errorf("hand over %s: %w", dir, err)
	}
	if st.Uid == 0 {
		return nil
	}
	uid, gid := int(st.Uid), int(st.Gid)
	var errs []error
	give := func(p string) {
		var fst syscall.Stat_t
		if err := syscall.Lstat(p, &fst); err != nil || fst.Uid != 0 {
			return
		}
		if err := os.Lchown(p, uid, gid); err != nil {
			errs = append(errs, err)
		}
	}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			errs = append(errs, err)
			return nil
		}
		give(p)
		return nil
	})
	if err != nil {
		errs = append(errs, err)
	}
	for _, p := range extra {
		if p != "" {
			give(p)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("hand over %s to uid %d: %w", dir, uid, err)
	}
	return nil
}

// serviceOfPID names the systemd service whose cgroup pid is in ("" if
// none): the last path element of its cgroup (v2, or v1's systemd
// hierarchy) that ends in ".service".
func serviceOfPID(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return ""
	}
	return serviceOfCgroup(string(b))
}

func serviceOfCgroup(cgroup string) string {
	for _, line := range strings.Split(cgroup, "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 || (parts[0] != "0" && parts[1] != "name=systemd") {
			continue
		}
		if strings.Contains(parts[2], "/user.slice/") {
			return "" // a login session or a user's own service manager
		}
		elems := strings.Split(parts[2], "/")
		for i := len(elems) - 1; i >= 0; i-- {
			if isUnitName(elems[i]) {
				return elems[i]
			}
		}
	}
	return ""
}

func serviceMainPID(ctx context.Context, unit string) int {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := runSystemctl(ctx, "show", "--property=MainPID", "--value", unit)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(out)
	return pid
}

func systemctlRun(ctx context.Context, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	_, err := runSystemctl(ctx, args...)
	return err
}
