// Command bench measures gwagent against the gateway budget (make bench):
// memory while sending, start-up time, private-key operations per
// provisioning, outbox drain throughput after an outage and bytes written to
// disk per message. It runs azsim in-process and bin/gwagent (built by make)
// as a child process with a swtpm-held key, as a gateway would.
//
// Usage: go run ./internal/bench -gwagent bin/gwagent -sizes "STATIC FULL" -out bin/bench.json
package main

import (
	"bufio"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/gwagent/gwagent/internal/azsim"
	"github.com/gwagent/gwagent/internal/tlsconf"
	"github.com/gwagent/gwagent/provisioning"
	"github.com/gwagent/gwagent/transport"
)

type row struct {
	Metric string  `json:"metric"`
	Value  float64 `json:"value"`
	Unit   string  `json:"unit"`
	Target string  `json:"target,omitempty"`
	Note   string  `json:"note,omitempty"`
}

func main() {
	gw := flag.String("gwagent", "bin/gwagent", "gwagent binary")
	sizes := flag.String("sizes", "", "\"STATIC FULL\" stripped arm64 sizes in bytes")
	out := flag.String("out", "bin/bench.json", "JSON output")
	onlyTPM := flag.Bool("tpm-only", false, "run only the TPM attestation section")
	flag.Parse()
	var rows []row
	if f := strings.Fields(*sizes); len(f) == 2 {
		s, _ := strconv.ParseFloat(f[0], 64)
		fl, _ := strconv.ParseFloat(f[1], 64)
		rows = append(rows, row{"binary size, linux/arm64 CGO-free (stripped)", s / (1 << 20), "MiB", "<= 8", ""},
			row{"binary size, linux/arm64 full with PKCS#11 (stripped)", fl / (1 << 20), "MiB", "", ""})
	}
	b, err := newBench(*gw)
	if err != nil {
		fail(err)
	}
	defer b.close()
	sections := []func() ([]row, error){b.coldStart, b.keyOps, b.steady, b.drain, b.transports, b.tpmAttestation}
	if *onlyTPM {
		sections = sections[5:]
	}
	for _, f := range sections {
		r, err := f()
		if err != nil {
			fail(err)
		}
		rows = append(rows, r...)
	}
	fmt.Printf("%-58s %12s %-6s %-8s %s\n", "metric", "value", "unit", "target", "note")
	for _, r := range rows {
		fmt.Printf("%-58s %12.2f %-6s %-8s %s\n", r.Metric, r.Value, r.Unit, r.Target, r.Note)
	}
	j, _ := json.MarshalIndent(rows, "", "  ")
	if err := os.WriteFile(*out, append(j, '\n'), 0o644); err != nil {
		fail(err)
	}
	fmt.Println("written", *out)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "bench:", err)
	os.Exit(1)
}

type bench struct {
	gw    string
	dir   string
	az    *azsim.Server
	info  azsim.Info
	swtpm *exec.Cmd
	sock  string
	n     int
}

func newBench(gw string) (*bench, error) {
	dir, err := os.MkdirTemp("", "gwbench")
	if err != nil {
		return nil, err
	}
	b := &bench{gw: gw, dir: dir}
	b.az, err = azsim.New(azsim.Config{StateDir: filepath.Join(dir, "azsim"), DPSAddr: "127.0.0.1:0", HubAddr: "127.0.0.1:0",
		AdminAddr: "127.0.0.1:0", DPSHTTPSAddr: "127.0.0.1:0", RetryAfter: 1, TelemetryLog: filepath.Join(dir, "telemetry.jsonl")})
	if err != nil {
		return nil, err
	}
	if err := b.az.Start(); err != nil {
		return nil, err
	}
	b.info = b.az.Info()
	b.sock = filepath.Join(dir, "tpm.sock")
	b.swtpm = exec.Command("swtpm", "socket", "--tpm2", "--server", "type=unixio,path="+b.sock, "--ctrl",
		"type=unixio,path="+filepath.Join(dir, "ctrl.sock"), "--tpmstate", "dir="+dir, "--flags", "not-need-init,startup-clear")
	if err := b.swtpm.Start(); err != nil {
		return nil, fmt.Errorf("swtpm: %w (make bench installs it)", err)
	}
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(b.sock); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return b, nil
}

func (b *bench) close() {
	b.swtpm.Process.Kill()
	b.swtpm.Wait()
	b.az.Close()
	os.RemoveAll(b.dir)
}

// device writes a config for a new gateway (symmetric-key onboarding, TPM
// operational key) and returns its directory.
func (b *bench) device(interval string) (string, string) {
	b.n++
	reg := fmt.Sprintf("bench-%d", b.n)
	d := filepath.Join(b.dir, reg)
	os.MkdirAll(d, 0o700)
	groupKey := ""
	for _, e := range b.az.DPS.Enrollments() {
		if e.ID == azsim.SymmetricKeyGroup {
			groupKey = e.PrimaryKey
		}
	}
	key, _ := derive(groupKey, reg)
	os.WriteFile(filepath.Join(d, "sas"), []byte(key), 0o600)
	cfg := fmt.Sprintf(`state_dir = %q
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
key = "tpm2:socket=%s;handle=0x%08X"
[telemetry]
interval = %q
`, filepath.Join(d, "state"), b.info.TrustBundle, b.info.IDScope, reg, b.info.DPSAddr, filepath.Join(d, "sas"), b.sock, 0x81000100+4*b.n, interval)
	os.WriteFile(filepath.Join(d, "gwagent.toml"), []byte(cfg), 0o600)
	return d, reg
}

func (b *bench) start(d string) (*exec.Cmd, error) {
	cmd := exec.Command(b.gw, "run", "--config", filepath.Join(d, "gwagent.toml"))
	log, _ := os.Create(filepath.Join(d, "agent.log"))
	cmd.Stdout, cmd.Stderr = log, log
	return cmd, cmd.Start()
}

func stop(cmd *exec.Cmd) {
	cmd.Process.Signal(os.Interrupt)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}

// arrivals counts telemetry from deviceID, with key in the body if key != "".
func (b *bench) arrivals(deviceID, key string) (n int, first, last time.Time) {
	f, err := os.Open(filepath.Join(b.dir, "telemetry.jsonl"))
	if err != nil {
		return 0, first, last
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var m struct {
			DeviceID   string          `json:"deviceId"`
			Body       json.RawMessage `json:"body"`
			ReceivedAt time.Time       `json:"receivedAt"`
		}
		if json.Unmarshal(sc.Bytes(), &m) != nil || m.DeviceID != deviceID {
			continue
		}
		if key != "" && !strings.Contains(string(m.Body), `"`+key+`"`) {
			continue
		}
		if n == 0 {
			first = m.ReceivedAt
		}
		last = m.ReceivedAt
		n++
	}
	return n, first, last
}

func waitFor(d time.Duration, cond func() bool) bool {
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		if cond() {
			return true
		}
		time.Sleep(5 * time.Millisecond)
	}
	return false
}

// coldStart: empty state dir to the first acknowledged message, then a
// restart with the stored identity to the first acknowledged message.
func (b *bench) coldStart() ([]row, error) {
	d, reg := b.device("1h")
	t0 := time.Now()
	cmd, err := b.start(d)
	if err != nil {
		return nil, err
	}
	if !waitFor(60*time.Second, func() bool { n, _, _ := b.arrivals(reg, ""); return n >= 1 }) {
		return nil, fmt.Errorf("cold start: no telemetry within 60s")
	}
	cold := time.Since(t0)
	stop(cmd)
	t1 := time.Now()
	cmd, err = b.start(d)
	if err != nil {
		return nil, err
	}
	if !waitFor(30*time.Second, func() bool { n, _, _ := b.arrivals(reg, ""); return n >= 2 }) {
		return nil, fmt.Errorf("warm start: no telemetry within 30s")
	}
	warm := time.Since(t1)
	stop(cmd)
	return []row{
		{"start to first acked message, empty state (swtpm key)", cold.Seconds(), "s", "<= 1",
			"includes DPS's 202 + retry-after (agent waits >= 2 s, as the SDKs)"},
		{"start to first acked message, provisioned (swtpm key)", warm.Seconds(), "s", "<= 1", ""},
	}, nil
}

// counting wraps a signer and counts its operations.
type counting struct {
	crypto.Signer
	n atomic.Int64
}

func (c *counting) Sign(r io.Reader, d []byte, o crypto.SignerOpts) ([]byte, error) {
	c.n.Add(1)
	return c.Signer.Sign(r, d, o)
}

// keyOps counts private-key operations for one X.509-onboarded provisioning
// and the first hub connection.
func (b *bench) keyOps() ([]row, error) {
	onKey, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "bench-keyops"}}, onKey)
	chainPEM, err := b.az.FactorySign(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	if err != nil {
		return nil, err
	}
	var chain []*x509.Certificate
	for blk, rest := pem.Decode(chainPEM); blk != nil; blk, rest = pem.Decode(rest) {
		c, _ := x509.ParseCertificate(blk.Bytes)
		chain = append(chain, c)
	}
	roots, err := tlsconf.LoadPool(b.info.TrustBundle)
	if err != nil {
		return nil, err
	}
	opKey, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	on, op := &counting{Signer: onKey}, &counting{Signer: opKey}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	issued, err := provisioning.Obtain(ctx, provisioning.DPSConfig{Endpoint: b.info.DPSAddr, IDScope: b.info.IDScope,
		RegistrationID: "bench-keyops", Roots: roots, Credential: provisioning.X509Credential{Signer: on, Chain: chain}}, op, time.Now(), nil)
	if err != nil {
		return nil, err
	}
	sess, err := transport.Dial(ctx, transport.Config{Host: issued.State.AssignedHub, DeviceID: issued.State.DeviceID, Roots: roots, Signer: op, Chain: issued.Chain})
	if err != nil {
		return nil, err
	}
	sess.Close()
	return []row{
		{"private-key ops per provisioning: onboarding key", float64(on.n.Load()), "ops", "", "one TLS handshake with DPS"},
		{"private-key ops per provisioning: new operational key", float64(op.n.Load()), "ops", "", "CSR + first hub TLS handshake"},
	}, nil
}

func procStatus(pid int, field string) float64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, field+":") {
			v, _ := strconv.ParseFloat(strings.Fields(l)[1], 64)
			return v
		}
	}
	return 0
}

func procIO(pid int, field string) float64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, field+":") {
			v, _ := strconv.ParseFloat(strings.TrimSpace(strings.TrimPrefix(l, field+":")), 64)
			return v
		}
	}
	return 0
}

// steady: RSS and disk writes while sending one message per second.
func (b *bench) steady() ([]row, error) {
	d, reg := b.device("1s")
	cmd, err := b.start(d)
	if err != nil {
		return nil, err
	}
	defer stop(cmd)
	if !waitFor(60*time.Second, func() bool { n, _, _ := b.arrivals(reg, ""); return n >= 3 }) {
		return nil, fmt.Errorf("steady: no telemetry")
	}
	pid := cmd.Process.Pid
	n0, _, _ := b.arrivals(reg, "")
	w0 := procIO(pid, "write_bytes")
	time.Sleep(20 * time.Second)
	n1, _, _ := b.arrivals(reg, "")
	w1 := procIO(pid, "write_bytes")
	rss := procStatus(pid, "VmRSS") / 1024
	hwm := procStatus(pid, "VmHWM") / 1024
	anon, file := procStatus(pid, "RssAnon")/1024, procStatus(pid, "RssFile")/1024
	perMsg := (w1 - w0) / float64(max(n1-n0, 1))
	return []row{
		{"steady-state RSS, 1 message/s", rss, "MiB", "<= 12", fmt.Sprintf("peak %.1f; heap etc. %.1f, binary pages %.1f", hwm, anon, file)},
		{"bytes written to disk per telemetry message", perMsg, "B", "", fmt.Sprintf("%d messages, /proc/PID/io write_bytes", n1-n0)},
	}, nil
}

// drain: 10,000 messages queued while the hub refuses connections, then the
// hub comes back; messages per second from the first to the last arrival.
func (b *bench) drain() ([]row, error) {
	const total = 10000
	d, reg := b.device("1h")
	cmd, err := b.start(d)
	if err != nil {
		return nil, err
	}
	defer stop(cmd)
	if !waitFor(60*time.Second, func() bool { n, _, _ := b.arrivals(reg, ""); return n >= 1 }) {
		return nil, fmt.Errorf("drain: no telemetry")
	}
	b.az.Faults.RefuseUntil("hub", time.Now().Add(time.Hour))
	b.az.Hub.DropAll()
	spool := filepath.Join(d, "state", "spool")
	for i := 0; i < total; i++ {
		p := filepath.Join(spool, fmt.Sprintf("m%05d.json", i))
		os.WriteFile(p+".tmp", []byte(fmt.Sprintf(`{"drain":%d,"pad":"0123456789abcdef0123456789abcdef"}`, i)), 0o644)
		os.Rename(p+".tmp", p)
	}
	// Wait until the agent took every file into its outbox.
	log := filepath.Join(d, "agent.log")
	waitFor(120*time.Second, func() bool {
		b, _ := os.ReadFile(log)
		return strings.Count(string(b), "spool file queued") >= total
	})
	b.az.Faults.RefuseUntil("hub", time.Time{})
	if !waitFor(300*time.Second, func() bool { n, _, _ := b.arrivals(reg, "drain"); return n >= total }) {
		n, _, _ := b.arrivals(reg, "drain")
		return nil, fmt.Errorf("drain: only %d of %d messages arrived", n, total)
	}
	n, first, last := b.arrivals(reg, "drain")
	rate := float64(n) / last.Sub(first).Seconds()
	return []row{{"outbox drain after an outage, 10,000 queued", rate, "msg/s", ">= 2000", "first to last arrival at the hub"}}, nil
}

func derive(groupKey, reg string) (string, error) {
	return provisioning.DeriveDeviceKey(groupKey, reg)
}
