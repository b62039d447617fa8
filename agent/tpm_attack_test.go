package agent_test

// Attacks on TPM attestation with the whole agent: the agent SIGKILLed at
// each step of a TPM-attested provisioning, and swtpm vanishing in the
// middle of it. Real swtpm, real azsim (DPS over HTTPS), real SIGKILL of a
// real process: this test binary re-executed as the agent (TestMain).
//
// The precise points come from a relay on the TPM socket (tpmRelay): it
// passes each command to swtpm and, at the chosen one, acts after swtpm
// answered and before the agent got the answer: it SIGKILLs the agent, or
// kills swtpm. swtpm has executed the command; the agent never learns it.

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	tpm "github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/internal/retry"
	"github.com/gwagent/gwagent/provisioning"
)

const attackAgentEnv = "GWAGENT_TEST_ATTACK_AGENT"

// TestMain lets this test binary run as the agent for the SIGKILL tests,
// and runs four of the package's parallel tests at a time unless
// -test.parallel says otherwise: they wait on timers, azsim and the network
// far more than they compute (about 15 s of CPU in an 80 s run two at a
// time), so the default of one per CPU leaves a 2-core machine idle.
func TestMain(m *testing.M) {
	if cfg := os.Getenv(attackAgentEnv); cfg != "" {
		os.Exit(runAttackAgent(cfg))
	}
	flag.Parse()
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "test.parallel" })
	if !set {
		flag.Set("test.parallel", "4")
	}
	os.Exit(m.Run())
}

func runAttackAgent(cfg string) int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	a, err := agent.New(cfg, agent.Options{
		Logger:  log,
		Version: "test",
		Backoff: retry.Policy{Min: 200 * time.Millisecond, Max: 2 * time.Second},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	if err := a.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// tpmRelay passes TPM commands between the agent and swtpm, one
// connection per command as go-tpm's socket transport makes them.
type tpmRelay struct {
	t      *testing.T
	Sock   string // the agent's tpm2:socket=
	target string // swtpm's socket

	mu     sync.Mutex
	ln     *net.UnixListener
	counts map[tpm.TPMCC]int
	seq    []tpm.TPMCC
	// trap, if set, is called after swtpm answered the command and before
	// the answer is passed on; true drops the answer (the connection is
	// closed, as if the agent or swtpm died).
	trap func(cc tpm.TPMCC, n int) bool
	wg   sync.WaitGroup
}

func startTPMRelay(t *testing.T, target string) *tpmRelay {
	t.Helper()
	dir, err := os.MkdirTemp("", "tpmrelay") // short: a socket path has 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	r := &tpmRelay{t: t, Sock: filepath.Join(dir, "tpm.sock"), target: target, counts: map[tpm.TPMCC]int{}}
	r.up()
	t.Cleanup(func() {
		r.down()
		r.wg.Wait()
		os.RemoveAll(dir)
	})
	return r
}

// up listens (again) on Sock.
func (r *tpmRelay) up() {
	r.t.Helper()
	os.Remove(r.Sock)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: r.Sock, Net: "unix"})
	if err != nil {
		r.t.Fatal(err)
	}
	// Like a killed swtpm, a closed relay leaves its socket file behind:
	// connecting to it is refused.
	ln.SetUnlinkOnClose(false)
	r.mu.Lock()
	r.ln = ln
	r.mu.Unlock()
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			r.wg.Add(1)
			go func() {
				defer r.wg.Done()
				defer c.Close()
				r.relay(c)
			}()
		}
	}()
}

// down stops accepting: the agent's next command is refused.
func (r *tpmRelay) down() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ln != nil {
		r.ln.Close()
		r.ln = nil
	}
}

// arm sets the trap and resets the command counts (a new agent process).
func (r *tpmRelay) arm(trap func(cc tpm.TPMCC, n int) bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.trap, r.counts, r.seq = trap, map[tpm.TPMCC]int{}, nil
}

func readTPMMessage(c net.Conn) ([]byte, error) {
	hdr := make([]byte, 10)
	if _, err := io.ReadFull(c, hdr); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[2:6])
	if n < 10 || n > 1<<16 {
		return nil, fmt.Errorf("bad TPM message size %d", n)
	}
	msg := make([]byte, n)
	copy(msg, hdr)
	_, err := io.ReadFull(c, msg[10:])
	return msg, err
}

func (r *tpmRelay) relay(c net.Conn) {
	cmd, err := readTPMMessage(c)
	if err != nil {
		return
	}
	cc := tpm.TPMCC(binary.BigEndian.Uint32(cmd[6:10]))
	s, err := net.Dial("unix", r.target)
	if err != nil {
		return
	}
	defer s.Close()
	if _, err := s.Write(cmd); err != nil {
		return
	}
	rsp, err := readTPMMessage(s)
	if err != nil {
		return
	}
	r.mu.Lock()
	r.counts[cc]++
	n := r.counts[cc]
	r.seq = append(r.seq, cc)
	trap := r.trap
	r.mu.Unlock()
	if trap != nil && trap(cc, n) {
		return
	}
	c.Write(rsp)
}

// sequence is the commands relayed since arm, for failure messages.
func (r *tpmRelay) sequence() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var b strings.Builder
	for _, cc := range r.seq {
		fmt.Fprintf(&b, "%#x ", uint32(cc))
	}
	return b.String()
}

// tpmLeftovers lists the transient objects and sessions swtpm holds,
// asked directly (not through the relay).
func tpmLeftovers(t *testing.T, sock string) []tpm.TPMHandle {
	t.Helper()
	tr, err := linuxudstpm.Open(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	var out []tpm.TPMHandle
	for _, ht := range []tpm.TPMHT{tpm.TPMHTTransient, tpm.TPMHTHMACSession, tpm.TPMHTPolicySession} {
		rsp, err := tpm.GetCapability{Capability: tpm.TPMCapHandles, Property: uint32(ht) << 24, PropertyCount: 64}.Execute(tr)
		if err != nil {
			t.Fatal(err)
		}
		l, err := rsp.CapabilityData.Data.Handles()
		if err != nil {
			t.Fatal(err)
		}
		for _, h := range l.Handle {
			if k := uint32(h) >> 24; k == uint32(ht) || (ht != tpm.TPMHTTransient && (k == 2 || k == 3)) {
				out = append(out, h)
			}
		}
	}
	return out
}

// agentProc is the agent as a child process.
type agentProc struct {
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

func startAgentProc(t *testing.T, cfg, log string) *agentProc {
	t.Helper()
	f, err := os.OpenFile(log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), attackAgentEnv+"="+cfg)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &agentProc{cmd: cmd, log: log, done: make(chan struct{})}
	go func() {
		cmd.Wait()
		f.Close()
		close(p.done)
	}()
	t.Cleanup(func() { p.kill() })
	return p
}

func (p *agentProc) kill() {
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// stop ends the agent as systemd does (SIGTERM), SIGKILL after 20 s.
func (p *agentProc) stop() {
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		p.kill()
	}
}

func (p *agentProc) logText() string {
	b, _ := os.ReadFile(p.log)
	return string(b)
}

// tpmAgentConfig writes the config of a gateway with nothing but a TPM
// (reached through sock) and the id scope.
func tpmAgentConfig(t *testing.T, az *azsimtest.Azsim, sock string) (path, state string) {
	t.Helper()
	dir := t.TempDir()
	state = filepath.Join(dir, "state")
	path = filepath.Join(dir, "gwagent.toml")
	err := os.WriteFile(path, []byte(fmt.Sprintf(`state_dir = %q
trust_bundle = %q
log_level = "debug"
[identity]
id_scope = %q
dps_endpoint = %q
provisioning_timeout = "30s"
[onboarding]
kind = "tpm"
tpm = "tpm2:socket=%s"
[operational]
key = "tpm2:socket=%s;blob=%s/op.tpmkey"
[telemetry]
interval = "1h"
`, state, az.Info.TrustBundle, az.Info.IDScope, az.Info.DPSHTTPSAddr, sock, sock, state)), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	return path, state
}

// assertStateWhole: after a kill the state directory holds a whole
// identity or none, and no temporary files of interrupted writes.
func assertStateWhole(t *testing.T, state string) {
	t.Helper()
	s, err := provisioning.OpenStore(state)
	if err != nil {
		t.Fatalf("the state directory no longer opens after the kill: %v", err)
	}
	if id, err := s.Current(); err != nil && !errors.Is(err, provisioning.ErrNotProvisioned) {
		t.Fatalf("the identity is damaged after the kill: %v", err)
	} else if err == nil && (len(id.Chain) == 0 || id.DeviceID == "") {
		t.Fatalf("a partial identity after the kill: %+v", id)
	}
	filepath.WalkDir(state, func(p string, e os.DirEntry, err error) error {
		if err == nil && !e.IsDir() && (strings.Contains(e.Name(), ".tmp") || strings.HasPrefix(e.Name(), ".")) &&
			!strings.HasSuffix(e.Name(), ".lock") {
			t.Errorf("left after the kill: %s", p)
		}
		return nil
	})
}

// enrolledSWTPM is a swtpm whose EK is enrolled in azsim, and a relay to it.
func enrolledSWTPM(t *testing.T) (*azsimtest.Azsim, *testenv.SWTPM, string, *tpmRelay) {
	t.Helper()
	// One registration id provisions again and again here: DPS's limit of
	// 5 status polls per 10 s is off, so that each start is not held back
	// by the polls of the ones before.
	az := azsimtest.Start(t, azsim.Config{DPSPollLimit: -1})
	sw := testenv.StartSWTPM(t)
	ek, _ := readEK(t, sw.Sock)
	regID := provisioning.TPMRegistrationID(ek)
	enrollTPM(t, az, regID, ek)
	return az, sw, regID, startTPMRelay(t, sw.Sock)
}

// waitHealth waits for the agent to be connected and azsim to have more
// than before health messages from it.
func waitHealth(t *testing.T, az *azsimtest.Azsim, state, regID string, before int) {
	t.Helper()
	testenv.Eventually(t, 60*time.Second, "connected and a health message", func() bool {
		st, err := agent.ReadStatus(state)
		return err == nil && st.State == "connected" && len(received(az, regID, "health")) > before
	})
}

// The agent SIGKILLed at each step of a TPM-attested provisioning (and in
// its first TLS handshake), then started again: it provisions, reaches the
// hub and sends telemetry every time, with its state whole and nothing of
// the dead process left in the TPM. All kills hit one swtpm, as a gateway
// losing power over and over would, with no TPM reset in between.
func TestSIGKILLDuringTPMProvisioning(t *testing.T) {
	t.Parallel()
	az, sw, regID, relay := enrolledSWTPM(t)

	// Command numbers are per agent process. The ECC SRK is made and
	// persisted once per TPM (the first point); later starts find it.
	points := []struct {
		name string
		cc   tpm.TPMCC
		nth  int
	}{
		{"SRK persisted, its transient copy still loaded", tpm.TPMCCEvictControl, 1},
		{"EK derived, not yet saved", tpm.TPMCCCreatePrimary, 1},
		{"operational key created, its blob not written", tpm.TPMCCCreate, 1},
		{"RSA SRK derived for DPS", tpm.TPMCCCreatePrimary, 2},
		{"EK policy session open", tpm.TPMCCPolicySecret, 1},
		{"challenge activated with the EK", tpm.TPMCCActivateCredential, 1},
		{"HMAC key imported", tpm.TPMCCImport, 1},
		{"operational key loaded to sign the CSR", tpm.TPMCCLoad, 1},
		{"HMAC key loaded", tpm.TPMCCLoad, 2},
		{"SAS token signed in the TPM, registration not sent", tpm.TPMCCHMAC, 1},
		{"registered, signing in the first TLS handshake", tpm.TPMCCSign, 2},
	}
	for _, p := range points {
		t.Run(p.name, func(t *testing.T) {
			cfg, state := tpmAgentConfig(t, az, relay.Sock)
			log := filepath.Join(filepath.Dir(cfg), "agent.log")
			var victim atomic.Pointer[agentProc]
			killed := make(chan struct{})
			relay.arm(func(cc tpm.TPMCC, n int) bool {
				if cc != p.cc || n != p.nth {
					return false
				}
				close(killed)
				victim.Load().kill()
				return true
			})
			a := startAgentProc(t, cfg, log)
			victim.Store(a)
			select {
			case <-killed:
			case <-a.done:
			case <-time.After(60 * time.Second):
				t.Fatalf("the agent never reached the kill point (commands %s):\n%s", relay.sequence(), a.logText())
			}
			select {
			case <-killed:
			default:
				t.Fatalf("the agent ended before the kill point (commands %s):\n%s", relay.sequence(), a.logText())
			}
			<-a.done
			relay.arm(nil)
			left := tpmLeftovers(t, sw.Sock)
			t.Logf("killed after %#x #%d; the TPM holds %#x", uint32(p.cc), p.nth, left)
			assertStateWhole(t, state)

			before := len(received(az, regID, "health"))
			a = startAgentProc(t, cfg, log)
			waitHealth(t, az, state, regID, before)
			st, _ := agent.ReadStatus(state)
			if st.DeviceID != regID || len(st.Conditions) != 0 {
				t.Fatalf("after the restart: device %q (want %s), conditions %v", st.DeviceID, regID, st.Conditions)
			}
			l := a.logText()
			if !strings.Contains(l, "provisioned") {
				t.Fatalf("no provisioning in the log:\n%s", l)
			}
			if len(left) > 0 && !strings.Contains(l, fmt.Sprintf("killed process left in the TPM (it has no resource manager)\" tpm=\"tpm2:socket=%s\" count=%d", relay.Sock, len(left))) {
				t.Errorf("the restarted agent does not say it flushed %d handles:\n%s", len(left), l)
			}
			// Idle and connected: the agent holds nothing in the TPM.
			testenv.Eventually(t, 10*time.Second, "no transient objects or sessions in the TPM", func() bool {
				return len(tpmLeftovers(t, sw.Sock)) == 0
			})
			a.stop()
			assertStateWhole(t, state)
		})
	}

	t.Run("while polling DPS", func(t *testing.T) {
		az.Admin("POST", "/faults/assign-delay", map[string]any{"seconds": 3}, nil)
		cfg, state := tpmAgentConfig(t, az, relay.Sock)
		log := filepath.Join(filepath.Dir(cfg), "agent.log")
		a := startAgentProc(t, cfg, log)
		testenv.Eventually(t, 60*time.Second, "the agent waiting for DPS's assignment", func() bool {
			return strings.Contains(a.logText(), "DPS is assigning")
		})
		a.kill()
		az.Admin("POST", "/faults/assign-delay", map[string]any{"seconds": 0}, nil)
		if left := tpmLeftovers(t, sw.Sock); len(left) != 0 {
			t.Fatalf("the TPM holds %#x while the agent only waited for DPS", left)
		}
		assertStateWhole(t, state)
		before := len(received(az, regID, "health"))
		a = startAgentProc(t, cfg, log)
		waitHealth(t, az, state, regID, before)
		a.stop()
	})
}

// swtpm dies in the middle of the challenge: the agent keeps running, says
// which TPM is gone and what to do (status condition and log), stores
// nothing, retries with backoff, and provisions and sends telemetry once
// swtpm is back on its state directory.
func TestSWTPMVanishesDuringAttestation(t *testing.T) {
	t.Parallel()
	az, sw, regID, relay := enrolledSWTPM(t)
	gone := make(chan struct{})
	relay.arm(func(cc tpm.TPMCC, n int) bool {
		if cc != tpm.TPMCCActivateCredential || n != 1 {
			return false
		}
		sw.Stop() // SIGKILL: swtpm dies with the command done, unanswered
		relay.down()
		close(gone)
		return true
	})

	dir := t.TempDir()
	d := &device{t: t, az: az, dir: dir, path: filepath.Join(dir, "gwagent.toml")}
	cfg, state := tpmAgentConfig(t, az, relay.Sock)
	b, _ := os.ReadFile(cfg)
	d.write(string(b))
	r := d.start()
	select {
	case <-gone:
	case <-time.After(60 * time.Second):
		t.Fatalf("the agent never reached ActivateCredential (commands %s)", relay.sequence())
	}
	testenv.Eventually(t, 30*time.Second, "the TPM reported unavailable, and retried", func() bool {
		st, err := agent.ReadStatus(state)
		return err == nil && st.Conditions[agent.CondKeyStoreUnavailable] != "" &&
			strings.Count(r.log.String(), "provisioning failed") >= 2
	})
	st, _ := agent.ReadStatus(state)
	msg := st.Conditions[agent.CondKeyStoreUnavailable]
	t.Log(msg)
	for _, want := range []string{relay.Sock, "stopped answering", "swtpm"} {
		if !strings.Contains(msg, want) {
			t.Errorf("the condition does not say %q: %s", want, msg)
		}
	}
	if strings.Contains(msg, "another TPM") || st.Conditions[agent.CondOnboardingRejected] != "" {
		t.Errorf("a vanished TPM is reported as a refused challenge: %v", st.Conditions)
	}
	if st.State != "degraded" {
		t.Errorf("state %q, want degraded", st.State)
	}
	select {
	case err := <-r.done:
		t.Fatalf("the agent stopped: %v", err)
	default:
	}
	assertStateWhole(t, state)
	if s, _ := provisioning.OpenStore(state); s != nil {
		if _, err := s.Current(); !errors.Is(err, provisioning.ErrNotProvisioned) {
			t.Fatalf("an identity was stored while the TPM was gone: %v", err)
		}
	}

	// swtpm back on the same state, as after a restart of its service.
	relay.arm(nil)
	sw.Restart()
	relay.up()
	waitHealth(t, az, state, regID, 0)
	st, _ = agent.ReadStatus(state)
	if len(st.Conditions) != 0 {
		t.Fatalf("conditions left after the TPM came back: %v", st.Conditions)
	}
	testenv.Eventually(t, 10*time.Second, "no transient objects or sessions in the TPM", func() bool {
		return len(tpmLeftovers(t, sw.Sock)) == 0
	})

	// swtpm gone again while connected, and the hub drops the connection:
	// the TLS handshake cannot be signed. The agent must wait for the TPM,
	// not take the failed handshake for the hub refusing the identity (no
	// re-provisioning, no new key), and reconnect with the same identity.
	serial := d.current().Serial
	sw.Stop()
	relay.down()
	az.Admin("POST", "/faults/drop", map[string]any{"target": "hub"}, nil)
	failed := func() int {
		n := 0
		for _, l := range strings.Split(r.log.String(), "\n") {
			if strings.Contains(l, "hub connection failed") && strings.Contains(l, relay.Sock+" stopped answering") {
				n++
			}
		}
		return n
	}
	testenv.Eventually(t, 30*time.Second, "three reconnections failing for want of the TPM, naming it", func() bool {
		return failed() >= 3
	})
	// gwagent status must point at the TPM, not at the network: the hub
	// was reached (the handshake got as far as the client's signature).
	st, _ = agent.ReadStatus(state)
	if st.State == "connected" {
		t.Fatal("connected without a TPM")
	}
	msg = st.Conditions[agent.CondKeyStoreUnavailable]
	if !strings.Contains(msg, relay.Sock+" stopped answering") || !strings.Contains(msg, "swtpm") {
		t.Errorf("the TPM outage while connected is not reported as %s naming the TPM: %v", agent.CondKeyStoreUnavailable, st.Conditions)
	}
	if r, ok := st.Conditions[agent.CondHubUnreachable]; ok {
		t.Errorf("a TPM outage is reported as %s (%s): the user would look at the network", agent.CondHubUnreachable, r)
	}
	sw.Restart()
	relay.up()
	testenv.Eventually(t, 60*time.Second, "reconnected, no conditions left", func() bool {
		st, err := agent.ReadStatus(state)
		return err == nil && st.State == "connected" && len(st.Conditions) == 0
	})
	if id := d.current(); id.Serial != serial {
		t.Fatalf("the identity changed (serial %s, was %s): a TPM outage was taken for a refused identity", id.Serial, serial)
	}
	if strings.Contains(r.log.String(), "re-provision") {
		t.Fatalf("the agent re-provisioned because the TPM was gone:\n%s", r.log.String())
	}
}

// Another program fills the TPM (a swtpm socket: no resource manager) with
// objects it never flushes, long after the agent flushed the TPM at start.
// The agent's next signature (the TLS handshake of a reconnection) finds
// no room, flushes the leftovers, says so, and reconnects with its key:
// no key-store-unavailable, no restart needed.
func TestTPMFilledByAnotherProgramWhileConnected(t *testing.T) {
	t.Parallel()
	az, sw, regID, _ := enrolledSWTPM(t)
	d, r, state := startTPMDevice(t, az, sw.Sock, regID, nil)
	serial := d.current().Serial

	tr, err := linuxudstpm.Open(sw.Sock)
	if err != nil {
		t.Fatal(err)
	}
	leaked := 0
	for ; leaked < 64; leaked++ {
		_, err := tpm.CreatePrimary{PrimaryHandle: tpm.TPMRHOwner, InPublic: tpm.New2B(tpm.ECCSRKTemplate)}.Execute(tr)
		if errors.Is(err, tpm.TPMRCObjectMemory) {
			break
		}
		if err != nil {
			t.Fatalf("leaking objects: %v", err)
		}
	}
	tr.Close()
	if leaked == 0 || leaked == 64 {
		t.Fatalf("leaked %d objects: the TPM did not fill up", leaked)
	}
	connects := func() int { return strings.Count(r.log.String(), "to=connected") }
	before := connects()
	az.Admin("POST", "/faults/drop", map[string]any{"target": "hub"}, nil)
	testenv.Eventually(t, 60*time.Second, "reconnected with the TPM full of another program's objects", func() bool {
		st, err := agent.ReadStatus(state)
		return err == nil && st.State == "connected" && connects() > before
	})
	l := r.log.String()
	if !strings.Contains(l, fmt.Sprintf("the TPM was full: flushed transient objects and sessions another program left in it (it has no resource manager) and retried\" tpm=\"tpm2:socket=%s\" count=%d", sw.Sock, leaked)) {
		t.Errorf("the agent does not say it flushed the %d leaked objects:\n%s", leaked, l)
	}
	if strings.Contains(l, "OBJECT_MEMORY") {
		t.Errorf("a signature failed for want of TPM memory:\n%s", l)
	}
	if st, _ := agent.ReadStatus(state); len(st.Conditions) != 0 {
		t.Errorf("conditions after the reconnection: %v", st.Conditions)
	}
	if id := d.current(); id.Serial != serial {
		t.Fatalf("the identity changed (serial %s, was %s)", id.Serial, serial)
	}
	if left := tpmLeftovers(t, sw.Sock); len(left) != 0 {
		t.Fatalf("the TPM holds %#x", left)
	}
}

// The same outage with the operational key at a persistent handle: the
// key cannot even be opened for the handshake (reading the handle fails).
// Still the TPM's problem, not the network's.
func TestTPMGoneWhileConnectedPersistentKey(t *testing.T) {
	t.Parallel()
	az, _, regID, relay := enrolledSWTPM(t)
	_, r, state := startTPMDevice(t, az, relay.Sock, regID, func(toml, state string) string {
		return strings.Replace(toml, fmt.Sprintf("blob=%s/op.tpmkey", state), "handle=0x81000100", 1)
	})
	if !strings.Contains(r.log.String(), "0x81000100") {
		t.Fatalf("the operational key is not at the handle:\n%s", r.log.String())
	}

	relay.down()
	az.Admin("POST", "/faults/drop", map[string]any{"target": "hub"}, nil)
	testenv.Eventually(t, 30*time.Second, "a reconnection failed for want of the TPM", func() bool {
		for _, l := range strings.Split(r.log.String(), "\n") {
			if strings.Contains(l, "hub connection failed") && strings.Contains(l, relay.Sock+" stopped answering") {
				return true
			}
		}
		return false
	})
	st, _ := agent.ReadStatus(state)
	msg := st.Conditions[agent.CondKeyStoreUnavailable]
	if !strings.Contains(msg, "0x81000100") || !strings.Contains(msg, relay.Sock+" stopped answering") {
		t.Errorf("the TPM outage is not reported as %s naming the key and the TPM: %v", agent.CondKeyStoreUnavailable, st.Conditions)
	}
	if r, ok := st.Conditions[agent.CondHubUnreachable]; ok {
		t.Errorf("a TPM outage is reported as %s: %s", agent.CondHubUnreachable, r)
	}
	relay.up()
	testenv.Eventually(t, 60*time.Second, "reconnected, no conditions left", func() bool {
		st, err := agent.ReadStatus(state)
		return err == nil && st.State == "connected" && len(st.Conditions) == 0
	})
}

// startTPMDevice starts the agent in this process on the TPM config of
// tpmAgentConfig (changed by edit, if set) and waits until it has
// provisioned, connected and sent health.
func startTPMDevice(t *testing.T, az *azsimtest.Azsim, sock, regID string, edit func(toml, state string) string) (*device, *running, string) {
	t.Helper()
	dir := t.TempDir()
	d := &device{t: t, az: az, dir: dir, path: filepath.Join(dir, "gwagent.toml")}
	cfg, state := tpmAgentConfig(t, az, sock)
	b, _ := os.ReadFile(cfg)
	toml := string(b)
	if edit != nil {
		toml = edit(toml, state)
	}
	d.write(toml)
	r := d.start()
	waitHealth(t, az, state, regID, 0)
	return d, r, state
}
