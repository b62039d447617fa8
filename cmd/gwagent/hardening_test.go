package main

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"
	"github.com/gwagent/gwagent/internal/statelock"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/provisioning"
)

// -h and --help print the command's help once and exit 0 without acting:
// no agent starts, no key is made, nothing is renewed.
func TestHelpDoesNotAct(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	names := []string{"onboard csr", "onboard install", "onboard tpm", "onboard"}
	for _, c := range commands() {
		if c.name != "onboard" {
			names = append(names, c.name)
		}
	}
	for _, name := range names {
		for _, h := range []string{"-h", "--help", "-help"} {
			t.Run(strings.ReplaceAll(name, " ", "-")+"/"+h, func(t *testing.T) {
				args := append(strings.Fields(name), h)
				out, errOut, err := gw(t, args...)
				if err != nil {
					t.Fatalf("gwagent %s %s: %v (want exit 0)\n%s", name, h, err, errOut)
				}
				help := out + errOut
				if n := strings.Count(help, "usage: gwagent "+name); n != 1 {
					t.Fatalf("help printed %d times, want once:\n%s", n, help)
				}
				if ents, _ := os.ReadDir(dir); len(ents) != 0 {
					t.Fatalf("help acted: created %v", ents[0].Name())
				}
				// A flag line is "  -name ARG": a back-quoted phrase in a
				// flag's usage becomes ARG, garbling the help.
				for _, l := range strings.Split(help, "\n") {
					if strings.HasPrefix(l, "  -") && len(strings.Fields(l)) > 2 {
						t.Errorf("garbled flag line %q", l)
					}
				}
			})
		}
	}
}

// gwProc runs gwagent as a separate process with args and waits for it.
func gwProc(t *testing.T, timeout time.Duration, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "GWAGENT_TEST_EXEC="+strings.Join(args, "\n"))
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("gwagent %s did not exit within %s:\n%s", strings.Join(args, " "), timeout, out)
	}
	return string(out), err
}

// Two agents on one state directory knock each other off the hub: the
// second exits at once naming the first, and so do commands that change
// state. After a SIGKILL the lock is gone with the process.
func TestOneAgentPerStateDir(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	d := newCrashDevice(t, az, "gw-lock-1", "")
	first := d.start()
	testenv.Eventually(t, 30*time.Second, "the first agent connected", func() bool {
		st, err := agent.ReadStatus(d.state)
		return err == nil && st.State == "connected"
	})
	want := fmt.Sprintf("already running (pid %d)", first.Process.Pid)
	out, err := gwProc(t, 20*time.Second, "run", "--config", d.cfg)
	if err == nil || !strings.Contains(out, want) {
		t.Fatalf("second gwagent run: %v, want an error saying %q:\n%s", err, want, out)
	}
	for _, args := range [][]string{{"provision", "--config", d.cfg}, {"onboard", "csr", "--config", d.cfg}} {
		if _, _, err := gw(t, args...); err == nil || !errors.Is(err, statelock.ErrAlreadyRunning) || !strings.Contains(err.Error(), want) {
			t.Fatalf("gwagent %s beside a running agent: %v, want %q", args[0], err, want)
		}
	}
	status, _, err := gw(t, "status", "--config", d.cfg)
	if err != nil || !regexpMatch(`state: +connected \(updated \d+s ago`, status) {
		t.Fatalf("status: %v\n%s", err, status)
	}
	first.Process.Signal(syscall.SIGKILL)
	first.Wait()
	status, _, _ = gw(t, "status", "--config", d.cfg)
	if !strings.Contains(status, "agent not running; last update") {
		t.Fatalf("status after SIGKILL does not say the agent is gone:\n%s", status)
	}
	d.start()
	testenv.Eventually(t, 30*time.Second, "a new agent after the SIGKILL", func() bool {
		st, err := agent.ReadStatus(d.state)
		return err == nil && st.State == "connected" && st.PID != first.Process.Pid
	})
	if strings.Count(d.log(), "already running") != 0 {
		t.Fatalf("the restarted agent found the dead one's lock:\n%s", d.log())
	}
}

// A standalone `gwagent renew` (no service running) renews and leaves the
// state at "stopped", not "swapping-certificate".
func TestStandaloneRenewLeavesStateStopped(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	d := newCrashDevice(t, az, "gw-renew-alone", "")
	if _, errOut, err := gw(t, "provision", "--config", d.cfg); err != nil {
		t.Fatalf("provision: %v\n%s", err, errOut)
	}
	before := d.current().Serial
	out, errOut, err := gw(t, "renew", "--config", d.cfg)
	if err != nil || !strings.Contains(out, "renewed:") {
		t.Fatalf("renew: %v\n%s%s", err, out, errOut)
	}
	if d.current().Serial == before {
		t.Fatal("the certificate did not change")
	}
	st, err := agent.ReadStatus(d.state)
	if err != nil || st.State != "stopped" {
		t.Fatalf("state after a standalone renew: %+v, %v; want stopped", st, err)
	}
	status, _, _ := gw(t, "status", "--config", d.cfg)
	if !regexpMatch(`state: +stopped \d+s ago`, status) || !strings.Contains(status, "serial "+d.current().Serial) {
		t.Fatalf("status:\n%s", status)
	}
}

// Static mode (factory certificate, no DPS) is a state of its own: status
// shows the certificate and its expiry, health carries the days left, and
// `gwagent renew` says it cannot renew instead of signalling an agent that
// ignores it.
func TestStaticModeStatusAndRenew(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	dir := t.TempDir()
	keyURI, chainPath := az.FactoryDevice(t, dir, "gw-static-cli")
	d := &crashDevice{t: t, az: az, dir: dir, cfg: filepath.Join(dir, "gwagent.toml"), state: filepath.Join(dir, "state")}
	os.WriteFile(d.cfg, []byte(fmt.Sprintf(`state_dir = "state"
trust_bundle = %q
[operational]
key = %q
[hub]
host = %q
device_id = "gw-static-cli"
chain = "chain.pem"
[telemetry]
interval = "1h"
`, az.Info.TrustBundle, keyURI, az.Info.HubHostName)), 0o600)
	agentProc := d.start()
	testenv.Eventually(t, 20*time.Second, "a health message with the days left", func() bool {
		for _, m := range az.Telemetry() {
			if b, ok := m["body"].(map[string]any); ok && m["deviceId"] == "gw-static-cli" && b["certDaysLeft"] != nil {
				return true
			}
		}
		return false
	})
	chain, _ := os.ReadFile(chainPath)
	leaf, _ := pem.Decode(chain)
	cert, err := x509.ParseCertificate(leaf.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	status, _, err := gw(t, "status", "--config", d.cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"mode:", "static", "device id:       gw-static-cli", "serial " + provisioning.FormatSerial(cert.SerialNumber),
		cert.NotAfter.UTC().Format(time.RFC3339), "left)", "next renewal:    none (static mode)"} {
		if !strings.Contains(status, want) {
			t.Errorf("status lacks %q:\n%s", want, status)
		}
	}
	if strings.Contains(status, "not provisioned") {
		t.Errorf("status says not provisioned in static mode:\n%s", status)
	}
	_, _, err = gw(t, "renew", "--config", d.cfg)
	if err == nil || !strings.Contains(err.Error(), "static mode") || !strings.Contains(err.Error(), "cannot be renewed") {
		t.Fatalf("renew in static mode: %v, want a refusal that names static mode", err)
	}
	if !processRunning(agentProc) {
		t.Fatal("the static agent died")
	}
}

func processRunning(c *exec.Cmd) bool {
	return c.ProcessState == nil && syscall.Kill(c.Process.Pid, 0) == nil
}

func regexpMatch(re, s string) bool { return regexp.MustCompile(re).MatchString(s) }

// `gwagent status` on a config path that is a FIFO or a link to /dev/zero
// exits at once with a clear error (it used to hang, deaf to SIGTERM, or run
// out of memory).
func TestStatusOnHostileConfigPath(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo.toml")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	zero := filepath.Join(dir, "zero.toml")
	os.Symlink("/dev/zero", zero)
	for path, want := range map[string]string{fifo: "is a FIFO, not a regular file", zero: "is a device, not a regular file"} {
		out, err := gwProc(t, 20*time.Second, "status", "--config", path)
		if err == nil || !strings.Contains(out, want) {
			t.Errorf("status --config %s: %v, want %q:\n%s", filepath.Base(path), err, want, out)
		}
	}
}

// `gwagent status` only looks. Before the service ever ran it creates
// nothing: `sudo gwagent status` used to create a root-owned 0700
// STATE_DIR/identity, which left the service (user gwagent) unable to store
// the identity it then provisioned.
func TestStatusCreatesNothing(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	cfg := filepath.Join(dir, "gwagent.toml")
	conf := fmt.Sprintf(`state_dir = %q
trust_bundle = "roots.pem"
[identity]
id_scope = "0ne00AZSIM"
registration_id = "gw-1"
[onboarding]
kind = "x509"
key = "file:/s/onb.key"
chain = "onb.pem"
[operational]
key = "file:/s/op.key"
[telemetry]
spool_dir = %q
`, state, filepath.Join(dir, "spool"))
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	out, _, err := gw(t, "status", "--config", cfg)
	if err != nil || !strings.Contains(out, "never run") || !strings.Contains(out, "not provisioned") {
		t.Fatalf("status: %v\n%s", err, out)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		names := []string{}
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Fatalf("status created %v", names)
	}
	// An existing state directory without an identity yet: still nothing
	// created inside.
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, _, err := gw(t, "status", "--config", cfg); err != nil || !strings.Contains(out, "not provisioned") {
		t.Fatalf("status: %v\n%s", err, out)
	}
	if ents, _ := os.ReadDir(state); len(ents) != 0 {
		t.Fatalf("status created %s in the state directory", ents[0].Name())
	}
}

// `gwagent status` with a FIFO as the lock file or status.json answers at
// once instead of hanging in open(2), where SIGTERM could not stop it.
func TestStatusWithFIFOsInTheStateDir(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "gwagent.toml")
	conf := fmt.Sprintf("state_dir = %q\ntrust_bundle = \"roots.pem\"\n[identity]\nid_scope = \"0ne00AZSIM\"\nregistration_id = \"gw-1\"\n"+
		"[onboarding]\nkind = \"x509\"\nkey = \"file:/s/onb.key\"\nchain = \"onb.pem\"\n[operational]\nkey = \"file:/s/op.key\"\n[telemetry]\nspool_dir = %q\n",
		state, filepath.Join(dir, "spool"))
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	// The lock file a FIFO, status.json a stopped agent's: status reads
	// the state and cannot tell from the lock, so it falls back on the pid.
	if err := syscall.Mkfifo(filepath.Join(state, "gwagent.lock"), 0o600); err != nil {
		t.Fatal(err)
	}
	st := fmt.Sprintf(`{"state":"connected","pid":%d,"updatedAt":%q}`, 1<<22+1, time.Now().UTC().Format(time.RFC3339))
	if err := os.WriteFile(filepath.Join(state, "status.json"), []byte(st), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := gwProc(t, 20*time.Second, "status", "--config", cfg)
	if !strings.Contains(out, "agent not running") {
		t.Fatalf("status with a FIFO lock: %v\n%s", err, out)
	}
	// status.json a FIFO too: named as such.
	os.Remove(filepath.Join(state, "status.json"))
	if err := syscall.Mkfifo(filepath.Join(state, "status.json"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err = gwProc(t, 20*time.Second, "status", "--config", cfg)
	if !strings.Contains(out, "status.json is a FIFO") {
		t.Fatalf("status with a FIFO status.json: %v, want it named:\n%s", err, out)
	}
}

// A brand-new state directory on a full disk (a real tmpfs without a free
// block): `gwagent run` starts instead of failing, and `gwagent status`,
// with no status file to read, says the agent is running and the disk is
// full; once space is freed the agent provisions and status says so,
// without a restart.
func TestStatusFreshStateDirOnFullDisk(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	d := newCrashDevice(t, az, "gw-fresh-full", "")
	os.RemoveAll(d.state)
	testenv.Tmpfs(t, d.state, "size=1m,mode=0700")
	free := testenv.Fill(t, d.state, false)
	d.start()
	var out string
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("status:\n%s\nagent log:\n%s", out, d.log())
		}
	})
	testenv.Eventually(t, 30*time.Second, "status: running, disk full", func() bool {
		out, _, _ = gw(t, "status", "--config", d.cfg)
		// Not even the pid fits in the lock file.
		return strings.Contains(out, "state:           running, no status file written yet") && strings.Contains(out, "disk-full: no space left on the file system of "+d.state)
	})
	if !strings.Contains(d.log(), "condition=disk-full") {
		t.Fatalf("the log does not say the disk is full:\n%s", d.log())
	}
	free()
	testenv.Eventually(t, 30*time.Second, "connected once space was freed", func() bool {
		out, _, _ = gw(t, "status", "--config", d.cfg)
		return strings.Contains(out, "state:           connected") && !strings.Contains(out, "disk-full")
	})
}

// More spool files than the kernel queues inotify events for arrive while
// the agent is stopped (SIGSTOP: a hostile application floods the spool,
// or the gateway is busy): the watch overflows, the agent says so, looks
// at the whole directory, and delivers every file once.
func TestSpoolWatchOverflow(t *testing.T) {
	b, err := os.ReadFile("/proc/sys/fs/inotify/max_queued_events")
	if err != nil {
		t.Fatal(err)
	}
	limit, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if limit <= 0 || limit > 200_000 {
		t.Fatalf("fs.inotify.max_queued_events is %d; the test floods past it", limit)
	}
	n := limit + 4000
	az := azsimtest.Start(t, azsim.Config{})
	d := newCrashDevice(t, az, "gw-overflow", "max_rate = 0\n") // the agent unpaced: what is tested is the watch
	cmd := d.start()
	testenv.Eventually(t, 30*time.Second, "connected", func() bool { return strings.Contains(d.log(), "to=connected") })
	stage := filepath.Join(d.dir, "stage")
	os.Mkdir(stage, 0o700)
	for i := range n {
		os.WriteFile(filepath.Join(stage, fmt.Sprintf("f%06d.json", i)), []byte(fmt.Sprintf(`{"flood":%d}`, i)), 0o640)
	}
	cmd.Process.Signal(syscall.SIGSTOP)
	for i := range n {
		if err := os.Rename(filepath.Join(stage, fmt.Sprintf("f%06d.json", i)), filepath.Join(d.spool, fmt.Sprintf("f%06d.json", i))); err != nil {
			t.Fatal(err)
		}
	}
	cmd.Process.Signal(syscall.SIGCONT)
	testenv.Eventually(t, 3*time.Minute, "every file delivered", func() bool {
		distinct, _ := bodies(az, "gw-overflow", "flood")
		return distinct == n
	})
	if !strings.Contains(d.log(), "event queue overflowed") {
		t.Fatal("the watch did not overflow: the test tested nothing")
	}
	if _, total := bodies(az, "gw-overflow", "flood"); total != n {
		t.Fatalf("%d messages for %d files", total, n)
	}
}
