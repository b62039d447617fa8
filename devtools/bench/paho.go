package main

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/gwagent/gwagent/internal/tlsconf"
	"github.com/gwagent/gwagent/transport"
)

// The plain paho reference: a client that publishes the drain's messages
// with every one in flight. For the drain rate it runs inside the bench
// (pahoReference), as the figure was measured so far; for CPU per message
// it runs as a process of its own (this binary again, with pahoChildEnv
// set: pahoProcess), so that its CPU time is its own and not azsim's.
const pahoChildEnv = "GWBENCH_PAHO_CHILD"

// pahoJob is what the reference publishes, and as whom.
type pahoJob struct {
	Host     string   `json:"host"` // as DPS assigned it: host or host:port
	DeviceID string   `json:"deviceId"`
	Chain    [][]byte `json:"chain"` // DER, leaf first
	Key      []byte   `json:"key"`   // PKCS#8 DER
	Bundle   string   `json:"bundle"`
	N        int      `json:"n"`
}

// newPahoJob provisions a software-key device for the reference.
func (b *bench) newPahoJob(n int, reg string) (pahoJob, error) {
	onKey, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	opKey, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	issued, _, err := b.identity(reg, onKey, opKey)
	if err != nil {
		return pahoJob{}, err
	}
	b.tel.track(issued.State.DeviceID)
	job := pahoJob{Host: issued.State.AssignedHub, DeviceID: issued.State.DeviceID, Bundle: b.info.TrustBundle, N: n}
	for _, c := range issued.Chain {
		job.Chain = append(job.Chain, c.Raw)
	}
	job.Key, err = x509.MarshalPKCS8PrivateKey(opKey)
	return job, err
}

// publish connects, publishes every message, and waits for every PUBACK;
// connected is called right after the CONNACK.
func (job pahoJob) publish(connected func()) error {
	key, err := x509.ParsePKCS8PrivateKey(job.Key)
	if err != nil {
		return err
	}
	roots, err := tlsconf.LoadPool(job.Bundle)
	if err != nil {
		return err
	}
	cert := tls.Certificate{PrivateKey: key, Certificate: job.Chain}
	host, hostname := job.Host, job.Host
	if i := strings.LastIndexByte(host, ':'); i > 0 {
		hostname = host[:i]
	} else {
		host += ":8883"
	}
	opts := mqtt.NewClientOptions().AddBroker("tls://" + host).SetClientID(job.DeviceID).
		SetUsername(hostname + "/" + job.DeviceID + "/?api-version=" + transport.DefaultAPIVersion).
		SetTLSConfig(&tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots, ServerName: hostname,
			// Always present the chain, as a client of Azure must: the hub's
			// CA list need not name the device's issuer (azsim's hard mode).
			GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }}).
		SetProtocolVersion(4).SetCleanSession(false).SetAutoReconnect(false).SetWriteTimeout(time.Minute)
	c := mqtt.NewClient(opts)
	if tok := c.Connect(); !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
		return fmt.Errorf("paho reference connect: %v", tok.Error())
	}
	defer c.Disconnect(100)
	connected()
	pad := strings.Repeat("x", 60)
	toks := make([]mqtt.Token, 0, job.N)
	base := "devices/" + job.DeviceID + "/messages/events/"
	for i := 0; i < job.N; i++ {
		topic := base + "%24.mid=" + url.QueryEscape(fmt.Sprintf("ref-%d", i)) + "&%24.ct=application%2Fjson&%24.ce=utf-8"
		toks = append(toks, c.Publish(topic, 1, false, []byte(fmt.Sprintf(`{"k":%d,"drain":true,"pad":%q}`, i, pad))))
	}
	for _, t := range toks {
		if !t.WaitTimeout(120*time.Second) || t.Error() != nil {
			return fmt.Errorf("paho reference publish: %v", t.Error())
		}
	}
	return nil
}

// rate is messages per second from connected to the last arrival at the
// hub of the n messages counted after before.
func (b *bench) rate(job pahoJob, before int, connected time.Time) (float64, error) {
	if !waitFor(60*time.Second, func() bool { return b.tel.count(job.DeviceID) >= before+job.N }) {
		return 0, fmt.Errorf("paho reference: messages missing at the hub")
	}
	st := b.tel.get(job.DeviceID)
	return float64(job.N) / st.arrivals[before+job.N-1].Sub(connected).Seconds(), nil
}

// pahoReference runs the reference inside the bench and returns messages
// per second from CONNACK to the last arrival at the hub.
func (b *bench) pahoReference(n int, reg string) (float64, error) {
	job, err := b.newPahoJob(n, reg)
	if err != nil {
		return 0, err
	}
	before := b.tel.count(job.DeviceID)
	var connected time.Time
	if err := job.publish(func() { connected = time.Now() }); err != nil {
		return 0, err
	}
	return b.rate(job, before, connected)
}

// paho is the reference's figures as a process of its own: its rate, and
// its CPU time per message from CONNACK to the last PUBACK (start-up and
// handshake left out).
type paho struct {
	rate float64
	cpu  time.Duration
}

func (b *bench) pahoProcess(n int, reg string) (paho, error) {
	job, err := b.newPahoJob(n, reg)
	if err != nil {
		return paho{}, err
	}
	jf := filepath.Join(b.dir, reg+".json")
	j, _ := json.Marshal(job)
	if err := os.WriteFile(jf, j, 0o600); err != nil {
		return paho{}, err
	}
	self, err := os.Executable()
	if err != nil {
		return paho{}, err
	}
	before := b.tel.count(job.DeviceID)
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), pahoChildEnv+"="+jf)
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return paho{}, fmt.Errorf("paho reference process: %w", err)
	}
	var connected, cpu int64
	for sc := bufio.NewScanner(strings.NewReader(string(out))); sc.Scan(); {
		if f := strings.Fields(sc.Text()); len(f) == 2 {
			v, _ := strconv.ParseInt(f[1], 10, 64)
			switch f[0] {
			case "connected":
				connected = v
			case "cpu":
				cpu = v
			}
		}
	}
	if connected == 0 || cpu == 0 {
		return paho{}, fmt.Errorf("paho reference process: unexpected output %q", out)
	}
	r, err := b.rate(job, before, time.Unix(0, connected))
	return paho{rate: r, cpu: time.Duration(cpu) / time.Duration(n)}, err
}

// pahoChild is the reference process: it prints the CONNACK time and the
// CPU time spent after it.
func pahoChild(jobFile string) error {
	j, err := os.ReadFile(jobFile)
	if err != nil {
		return err
	}
	var job pahoJob
	if err := json.Unmarshal(j, &job); err != nil {
		return err
	}
	var cpu0 time.Duration
	err = job.publish(func() {
		fmt.Println("connected", time.Now().UnixNano())
		cpu0 = selfCPU()
	})
	if err != nil {
		return err
	}
	fmt.Println("cpu", int64(selfCPU()-cpu0))
	return nil
}

// selfCPU is this process's user and system time.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// procCPU is a process's user and system time from /proc/PID/stat.
func procCPU(pid int) time.Duration {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	// The fields after the command name (which may hold spaces) in "()".
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64) // utime, field 14
	st, _ := strconv.ParseInt(f[12], 10, 64) // stime, field 15
	return time.Duration(ut+st) * time.Second / clockTicks
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat's times: 100 on every
// Linux architecture Go supports.
const clockTicks = 100
