package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/azsimtest"
	"github.com/gwagent/gwagent/internal/statelock"
)

func TestServiceOfCgroup(t *testing.T) {
	for _, c := range []struct{ name, cgroup, want string }{
		{"ok/v2-system-service", "0::/system.slice/gwagent.service\n", "gwagent.service"},
		{"ok/v2-own-slice", "0::/gateway.slice/gwagent.service\n", "gwagent.service"},
		{"ok/v1-systemd-hierarchy", "5:devices:/\n1:name=systemd:/system.slice/gwagent.service\n", "gwagent.service"},
		{"ok/template-instance", "0::/system.slice/system-gwagent.slice/gwagent@plant1.service\n", "gwagent@plant1.service"},
		{"fail/login-session", "0::/user.slice/user-0.slice/session-3.scope\n", ""},
		{"fail/user-service-manager", "0::/user.slice/user-1000.slice/user@1000.service/app.slice/term.service\n", ""},
		{"fail/container-root", "0::/\n", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := serviceOfCgroup(c.cgroup); got != c.want {
				t.Fatalf("%q: got %q, want %q", c.cgroup, got, c.want)
			}
		})
	}
}

// fakeService plays systemd for holdState: the "service" is a state lock
// held in this process, stopped by unlocking it.
type fakeService struct {
	t        *testing.T
	dir      string
	lock     *statelock.Lock
	calls    []string
	euid     int
	otherPID bool // the service's main pid is not the lock holder
	startErr error
}

func newFakeService(t *testing.T) *fakeService {
	f := &fakeService{t: t, dir: filepath.Join(t.TempDir(), "state")}
	lock, err := statelock.Take(f.dir)
	if err != nil {
		t.Fatal(err)
	}
	f.lock = lock
	t.Cleanup(func() { f.lock.Unlock() })
	return f
}

func (f *fakeService) host() host {
	return host{
		unitOf: func(pid int) string {
			if pid == os.Getpid() {
				return "gwagent.service"
			}
			return ""
		},
		mainPID: func(_ context.Context, unit string) int {
			if f.otherPID {
				return 1
			}
			return os.Getpid()
		},
		systemctl: func(_ context.Context, args ...string) error {
			f.calls = append(f.calls, strings.Join(args, " "))
			switch args[0] {
			case "stop":
				f.lock.Unlock()
			case "start":
				if f.startErr != nil {
					return f.startErr
				}
				l, err := statelock.Take(f.dir)
				if err != nil {
					f.t.Errorf("the service could not take the state directory back: %v", err)
					return err
				}
				f.lock = l
			}
			return nil
		},
		euid: func() int { return f.euid },
	}
}

// At the station the enabled service holds the state directory: the
// command stops it, works, and starts it again, even when it fails.
func TestHoldStateStopsAndStartsTheService(t *testing.T) {
	f := newFakeService(t)
	var stderr bytes.Buffer
	hold, err := holdState(context.Background(), f.dir, &stderr, f.host())
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(f.calls, ",") != "stop gwagent.service" {
		t.Fatalf("systemctl calls %v, want the service stopped", f.calls)
	}
	if readMarker(f.dir) != "gwagent.service" {
		t.Fatal("no marker naming the stopped service while the command runs")
	}
	hold.release(context.Background())
	if strings.Join(f.calls, ",") != "stop gwagent.service,start gwagent.service" {
		t.Fatalf("systemctl calls %v, want stop then start", f.calls)
	}
	if _, err := os.Stat(filepath.Join(f.dir, stationMarker)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("marker left after the service started again: %v", err)
	}
	if !strings.Contains(stderr.String(), "started gwagent.service again") {
		t.Fatalf("stderr does not say the service was started again:\n%s", &stderr)
	}
}

// A command SIGKILLed while the service was stopped leaves the marker: the
// next command (the station runs the step again) starts the service at its
// end. A marker that does not name a service is ignored.
func TestHoldStateRestartsWhatAKilledCommandStopped(t *testing.T) {
	f := newFakeService(t)
	f.lock.Unlock() // the service is stopped, the command that stopped it is gone
	writeMarker(f.dir, "gwagent.service")
	var stderr bytes.Buffer
	hold, err := holdState(context.Background(), f.dir, &stderr, f.host())
	if err != nil {
		t.Fatal(err)
	}
	if len(f.calls) != 0 {
		t.Fatalf("systemctl calls %v before the command", f.calls)
	}
	hold.release(context.Background())
	if strings.Join(f.calls, ",") != "start gwagent.service" {
		t.Fatalf("systemctl calls %v, want the stopped service started", f.calls)
	}
	if readMarker(f.dir) != "" {
		t.Fatal("marker left")
	}

	f.calls = nil
	f.lock.Unlock()
	os.WriteFile(filepath.Join(f.dir, stationMarker), []byte("../../etc/passwd; reboot\n"), 0o644)
	hold, err = holdState(context.Background(), f.dir, &stderr, f.host())
	if err != nil {
		t.Fatal(err)
	}
	hold.release(context.Background())
	if len(f.calls) != 0 {
		t.Fatalf("a marker that names no service made systemctl calls %v", f.calls)
	}
}

// Without root, or when the lock holder is not the service's own agent,
// nothing is stopped and the error says what to do.
func TestHoldStateRefuses(t *testing.T) {
	t.Run("fail/not-root", func(t *testing.T) {
		f := newFakeService(t)
		f.euid = 1000
		_, err := holdState(context.Background(), f.dir, &bytes.Buffer{}, f.host())
		if !errors.Is(err, statelock.ErrAlreadyRunning) || !strings.Contains(err.Error(), "run this command as root") {
			t.Fatalf("err %v, want already running with advice", err)
		}
		if len(f.calls) != 0 {
			t.Fatalf("systemctl calls %v", f.calls)
		}
	})
	t.Run("fail/not-the-service-main-process", func(t *testing.T) {
		f := newFakeService(t)
		f.otherPID = true
		_, err := holdState(context.Background(), f.dir, &bytes.Buffer{}, f.host())
		if !errors.Is(err, statelock.ErrAlreadyRunning) || len(f.calls) != 0 {
			t.Fatalf("err %v, calls %v; want already running and no systemctl call", err, f.calls)
		}
	})
	t.Run("fail/start-fails", func(t *testing.T) {
		f := newFakeService(t)
		f.startErr = errors.New("unit failed")
		var stderr bytes.Buffer
		hold, err := holdState(context.Background(), f.dir, &stderr, f.host())
		if err != nil {
			t.Fatal(err)
		}
		hold.release(context.Background())
		if !strings.Contains(stderr.String(), "systemctl start gwagent.service") || readMarker(f.dir) != "gwagent.service" {
			t.Fatalf("a failed start must be said and remembered for the next command:\n%s", &stderr)
		}
	})
}

// owner returns the uid of p (not following a link).
func owner(t *testing.T, p string) uint32 {
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Uid
}

const nobody = 65534

// handOver gives root's files in the state directory to its owner, leaves
// other users' files and link targets alone.
func TestHandOver(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("NEEDS ROOT: chown (make test runs as root in CI)")
	}
	dir := filepath.Join(t.TempDir(), "state")
	os.MkdirAll(filepath.Join(dir, "onboarding"), 0o755)
	os.WriteFile(filepath.Join(dir, "onboarding", "chain.pem"), []byte("x"), 0o600)
	os.WriteFile(filepath.Join(dir, "app.json"), []byte("{}"), 0o600)
	os.Chown(filepath.Join(dir, "app.json"), 12345, 12345)
	outside := filepath.Join(t.TempDir(), "root-only")
	os.WriteFile(outside, []byte("x"), 0o600)
	os.Symlink(outside, filepath.Join(dir, "link"))
	key := filepath.Join(t.TempDir(), "onboarding.key")
	os.WriteFile(key, []byte("k"), 0o600)
	os.Chown(dir, nobody, nobody)

	if err := handOver(dir, key); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{filepath.Join(dir, "onboarding"), filepath.Join(dir, "onboarding", "chain.pem"), filepath.Join(dir, "link"), key} {
		if u := owner(t, p); u != nobody {
			t.Errorf("%s owned by %d, want %d", p, u, nobody)
		}
	}
	if owner(t, filepath.Join(dir, "app.json")) != 12345 {
		t.Error("another user's file was taken")
	}
	if owner(t, outside) != 0 {
		t.Error("handOver followed a link out of the state directory")
	}
}

// factoryCSR runs `gwagent onboard csr` and has azsim's factory CA sign
// the CSR; it returns the chain's file in dir.
func factoryCSR(t *testing.T, az *azsimtest.Azsim, cfg, dir string) string {
	t.Helper()
	csr, _, err := gw(t, "onboard", "csr", "--config", cfg)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := az.Server.FactorySign([]byte(csr))
	if err != nil {
		t.Fatal(err)
	}
	chainFile := filepath.Join(dir, "signed.pem")
	os.WriteFile(chainFile, chain, 0o644)
	return chainFile
}

// The factory flow run as root (the station) on a state directory that
// belongs to the service user leaves nothing the service cannot use, and
// gwagent check finds a root-owned file an older version left.
func TestStationAsRootLeavesServiceFiles(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("NEEDS ROOT: chown (make test runs as root in CI)")
	}
	az := azsimtest.Start(t, azsim.Config{})
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	os.MkdirAll(state, 0o700)
	os.Chown(state, nobody, nobody)
	cfg := filepath.Join(dir, "gwagent.toml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`state_dir = %q
trust_bundle = %q
[identity]
id_scope = %q
registration_id = "gw-station-root"
dps_endpoint = %q
[onboarding]
kind = "x509"
key = "file:%s/onboarding/onboarding.key"
chain = "%s/onboarding/chain.pem"
[operational]
key = "file:%s/keys/operational.key"
`, state, az.Info.TrustBundle, az.Info.IDScope, az.Info.DPSAddr, state, state, state)), 0o600)

	chainFile := factoryCSR(t, az, cfg, dir)
	for _, args := range [][]string{{"onboard", "install", "--chain", chainFile}, {"onboard", "install", "--chain", chainFile}, {"provision"}} {
		if _, stderr, err := gw(t, append(args, "--config", cfg)...); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, stderr)
		}
	}
	n := 0
	filepath.WalkDir(state, func(p string, d fs.DirEntry, err error) error {
		n++
		if u := owner(t, p); u != nobody {
			t.Errorf("%s owned by uid %d after the station ran as root, want the service user's %d", p, u, nobody)
		}
		return nil
	})
	if n < 6 {
		t.Fatalf("only %d entries in the state directory; the flow did not run", n)
	}

	c := newChecker(cfg)
	c.serviceUser = "nobody"
	if r := results(c)["state-dir"]; r.Status != checkOK {
		t.Fatalf("state-dir %s %q", r.Status, r.Message)
	}
	left := filepath.Join(state, "onboarding", "old-chain.pem")
	os.WriteFile(left, []byte("x"), 0o600) // root's, as an older version left it
	c = newChecker(cfg)
	c.serviceUser = "nobody"
	r := results(c)["state-dir"]
	if r.Status != checkError || !strings.Contains(r.Message, left+" (owner root)") || !strings.Contains(r.Hint, "chown -R nobody: "+state) {
		t.Fatalf("state-dir %s %q (hint %q); want an error naming %s", r.Status, r.Message, r.Hint, left)
	}
}
