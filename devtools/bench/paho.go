package main

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/bench/pahoref"
	"github.com/gwagent/gwagent/transport"
)

// The plain paho reference: a client that publishes the drain's messages
// with every one in flight. For the drain rate it runs inside the bench
// (pahoReference), as the figure was measured so far; for CPU per message
// it runs as a process of its own (this binary again, with pahoChildEnv
// set: pahoProcess), so that its CPU time is its own and not azsim's.
const pahoChildEnv = "GWBENCH_PAHO_CHILD"

// pahoJob is what the reference publishes, and as whom.
type pahoJob = pahoref.Job

// newPahoJob provisions a software-key device for the reference.
func (b *bench) newPahoJob(n int, reg string) (pahoJob, error) {
	return newPahoJobAt(b.az, b.info, b.tel, n, reg)
}

// newPahoJobAt is newPahoJob with the device in az (Info info, telemetry
// log tel).
func newPahoJobAt(az *azsim.Server, info azsim.Info, tel *telemetry, n int, reg string) (pahoJob, error) {
	onKey, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	opKey, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	issued, _, err := identityAt(az, info, reg, onKey, opKey)
	if err != nil {
		return pahoJob{}, err
	}
	tel.track(issued.State.DeviceID)
	job := pahoJob{Host: issued.State.AssignedHub, DeviceID: issued.State.DeviceID, Bundle: info.TrustBundle,
		APIVersion: transport.DefaultAPIVersion, N: n}
	for _, c := range issued.Chain {
		job.Chain = append(job.Chain, c.Raw)
	}
	job.Key, err = x509.MarshalPKCS8PrivateKey(opKey)
	return job, err
}

// publishAll connects, publishes every message, and waits for every
// PUBACK; connected is called right after the CONNACK.
func publishAll(job pahoJob, connected func()) error {
	c, err := job.Connect()
	if err != nil {
		return fmt.Errorf("paho reference: %w", err)
	}
	defer c.Disconnect(100)
	connected()
	pad := strings.Repeat("x", 60)
	toks := make([]mqtt.Token, 0, job.N)
	for i := 0; i < job.N; i++ {
		toks = append(toks, c.Publish(job.Topic(i), 1, false, []byte(fmt.Sprintf(`{"k":%d,"drain":true,"pad":%q}`, i, pad))))
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
	if err := publishAll(job, func() { connected = time.Now() }); err != nil {
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

// pahoProcess runs the reference as a process of its own: argv is this
// bench's own binary, or an emulator and the bench built for another
// architecture.
func (b *bench) pahoProcess(n int, reg string, argv ...string) (paho, error) {
	job, err := b.newPahoJob(n, reg)
	if err != nil {
		return paho{}, err
	}
	jf := filepath.Join(b.dir, reg+".json")
	j, _ := json.Marshal(job)
	if err := os.WriteFile(jf, j, 0o600); err != nil {
		return paho{}, err
	}
	before := b.tel.count(job.DeviceID)
	cmd := exec.Command(argv[0], argv[1:]...)
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
	err = publishAll(job, func() {
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
