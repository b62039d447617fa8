package main

// Crash tests: the agent runs as a real separate process (this test binary
// re-executed as gwagent) and is killed with SIGKILL, against an azsim
// running in the test process.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/provisioning"
)

// TestMain lets the test binary act as gwagent for the crash tests.
func TestMain(m *testing.M) {
	if args := os.Getenv("GWAGENT_TEST_EXEC"); args != "" {
		// As main: SIGTERM is a clean shutdown.
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		err := run(ctx, strings.Split(args, "\n"), os.Stdout, os.Stderr)
		stop()
		if err != nil && !errors.Is(err, context.Canceled) {
			fmt.Fprintln(os.Stderr, "gwagent:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

type crashDevice struct {
	t     *testing.T
	az    *azsimtest.Azsim
	dir   string
	cfg   string
	spool string
	state string
}

func newCrashDevice(t *testing.T, az *azsimtest.Azsim, regID, extra string) *crashDevice {
	t.Helper()
	d := &crashDevice{t: t, az: az, dir: t.TempDir()}
	var k struct{ DeviceKey string }
	az.Admin("GET", "/dps/derive-key?group="+azsim.SymmetricKeyGroup+"&registrationId="+regID, nil, &k)
	keyFile := filepath.Join(d.dir, "device.sas")
	os.WriteFile(keyFile, []byte(k.DeviceKey), 0o600)
	d.state = filepath.Join(d.dir, "state")
	d.spool = filepath.Join(d.state, "spool")
	d.cfg = filepath.Join(d.dir, "gwagent.toml")
	os.WriteFile(d.cfg, []byte(fmt.Sprintf(`state_dir = %q
trust_bundle = %q
log_level = "debug"
[identity]
id_scope = %q
registration_id = %q
dps_endpoint = %q
[onboarding]
kind = "symmetric_key"
symmetric_key_file = %q
[operational]
key = "file:%s/device.key"
[telemetry]
interval = "1h"
%s`, d.state, az.Info.TrustBundle, az.Info.IDScope, regID, az.Info.DPSAddr, keyFile, d.state, extra)), 0o600)
	os.MkdirAll(d.spool, 0o700)
	return d
}

// start runs `gwagent run` as a child process with extra environment.
func (d *crashDevice) start(env ...string) *exec.Cmd {
	d.t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), append(env, "GWAGENT_TEST_EXEC=run\n--config\n"+d.cfg)...)
	log, _ := os.OpenFile(filepath.Join(d.dir, "agent.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	d.t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		log.Close()
	})
	return cmd
}

func (d *crashDevice) log() string {
	b, _ := os.ReadFile(filepath.Join(d.dir, "agent.log"))
	return string(b)
}

func (d *crashDevice) current() *provisioning.Identity {
	s, err := provisioning.OpenStore(d.state)
	if err != nil {
		return nil
	}
	id, _ := s.Current()
	return id
}

func (d *crashDevice) spoolFiles(prefix string, n int) {
	for i := range n {
		p := filepath.Join(d.spool, fmt.Sprintf("%s%03d.json", prefix, i))
		os.WriteFile(p, []byte(fmt.Sprintf(`{%q:%d}`, prefix, i)), 0o644)
	}
}

// bodies counts distinct values of key in the device's received messages.
func bodies(az *azsimtest.Azsim, deviceID, key string) (distinct, total int) {
	seen := map[float64]bool{}
	for _, m := range az.Telemetry() {
		if m["deviceId"] != deviceID {
			continue
		}
		if b, ok := m["body"].(map[string]any); ok {
			if v, ok := b[key].(float64); ok {
				seen[v] = true
				total++
			}
		}
	}
	return len(seen), total
}

func TestSIGKILLWithQueuedMessages(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	d := newCrashDevice(t, az, "gw-crash-outbox", "")
	// The hub refuses connections: messages pile up in the outbox.
	az.Admin("POST", "/faults/refuse", map[string]any{"target": "hub", "seconds": 120}, nil)
	cmd := d.start()
	testenv.Eventually(t, 30*time.Second, "provisioned", func() bool { return d.current() != nil })
	d.spoolFiles("queued", 30)
	testenv.Eventually(t, 10*time.Second, "30 messages queued in the outbox", func() bool {
		return outboxDepth(d) >= 30
	})
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	if n, _ := bodies(az, "gw-crash-outbox", "queued"); n != 0 {
		t.Fatalf("%d messages arrived while the hub refused connections", n)
	}
	az.Admin("DELETE", "/faults", nil, nil)
	az.Admin("POST", "/faults/refuse", map[string]any{"target": "hub", "seconds": 0}, nil)
	d.start()
	testenv.Eventually(t, 30*time.Second, "all 30 queued messages after the restart", func() bool {
		n, _ := bodies(az, "gw-crash-outbox", "queued")
		return n == 30
	})
	testenv.Eventually(t, 10*time.Second, "spool emptied after PUBACKs", func() bool {
		m, _ := filepath.Glob(filepath.Join(d.spool, "*.json"))
		return len(m) == 0
	})
}

// outboxDepth counts the spool files the agent has taken into its outbox
// (they stay until the hub acknowledged them); it reads the outbox
// directory's size as a proxy for "on disk before sent".
func outboxDepth(d *crashDevice) int {
	st, err := agent.ReadStatus(d.state)
	if err == nil && st.OutboxDepth > 0 {
		return st.OutboxDepth
	}
	// Status counters are flushed at most once a minute; fall back to the
	// log, which names every spooled file.
	return strings.Count(d.log(), "spool file queued")
}

// Kill the agent at each step of a certificate swap, then restart it: it
// must connect with a valid pair, and no message may be lost.
func TestKillDuringRenewal(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{CertLifetime: 10 * time.Second})
	renewal := `
[renewal]
threshold = 0.5
jitter = "1s"
floor = "1s"
retry_min = "500ms"
retry_max = "2s"
`
	for i, step := range []string{"renew-key-created", "renew-staged", "swap-connected", "swap-committed", "swap-old-key-gone"} {
		t.Run(step, func(t *testing.T) {
			regID := fmt.Sprintf("gw-kill-%d", i)
			d := newCrashDevice(t, az, regID, renewal)
			cmd := d.start("GWAGENT_TEST_CRASH_AT=" + step)
			testenv.Eventually(t, 30*time.Second, "provisioned", func() bool { return d.current() != nil })
			first := d.current().Serial
			d.spoolFiles("before", 5)
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case <-done:
			case <-time.After(40 * time.Second):
				t.Fatalf("the agent never reached step %s:\n%s", step, d.log())
			}
			if !strings.Contains(d.log(), "killing the agent") {
				t.Fatalf("the agent died before step %s:\n%s", step, d.log())
			}
			d.spoolFiles("after", 5)
			d.start()
			testenv.Eventually(t, 30*time.Second, "all messages from before and after the crash", func() bool {
				b, _ := bodies(az, regID, "before")
				a, _ := bodies(az, regID, "after")
				return b == 5 && a == 5
			})
			id := d.current()
			if id == nil || time.Now().After(id.NotAfter) {
				t.Fatal("no valid identity after the restart")
			}
			testenv.Eventually(t, 30*time.Second, "a renewed certificate in use", func() bool {
				cur := d.current()
				return cur != nil && cur.Serial != first && strings.Contains(d.log(), "certificate renewed and in use")
			})
		})
	}
}
