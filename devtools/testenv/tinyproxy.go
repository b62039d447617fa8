package testenv

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// ProxyOpts configures a test proxy.
type ProxyOpts struct {
	// User and Password, if set, make the proxy require Basic
	// authentication (407 without it).
	User, Password string
	// ConnectPorts, if set, are the only ports the proxy opens CONNECT
	// tunnels to (403 for others), like a site proxy that allows only 443.
	ConnectPorts []int
}

// Proxy is a real HTTP proxy (tinyproxy) on a loopback port. Stop and
// Start simulate a proxy that dies and returns on the same address.
type Proxy struct {
	t    testing.TB
	bin  string
	dir  string
	conf string
	// Addr is host:port; URL is http://Addr, without credentials.
	Addr string
	URL  *url.URL
	cmd  *exec.Cmd
	done chan struct{}
	log  Buffer
}

// StartTinyproxy starts tinyproxy with o; it is stopped when the test ends.
func StartTinyproxy(t testing.TB, o ProxyOpts) *Proxy {
	t.Helper()
	bin := LookPath(t, "tinyproxy", "tinyproxy-bin")
	dir := t.TempDir()
	p := &Proxy{t: t, bin: bin, dir: dir, conf: filepath.Join(dir, "tinyproxy.conf")}
	var err error
	for range 5 { // a free port can be taken between probe and bind
		p.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t)))
		p.writeConf(o)
		if err = p.start(); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	p.URL = &url.URL{Scheme: "http", Host: p.Addr}
	t.Cleanup(p.Stop)
	return p
}

func (p *Proxy) writeConf(o ProxyOpts) {
	_, port, _ := net.SplitHostPort(p.Addr)
	var b strings.Builder
	fmt.Fprintf(&b, "Port %s\nListen 127.0.0.1\nTimeout 60\nMaxClients 64\nAllow 127.0.0.1\nDisableViaHeader Yes\n", port)
	// No LogFile: with -d it logs to stderr, which Log returns.
	b.WriteString("LogLevel Connect\n")
	if o.User != "" {
		fmt.Fprintf(&b, "BasicAuth %s %s\n", o.User, o.Password)
	}
	for _, cp := range o.ConnectPorts {
		fmt.Fprintf(&b, "ConnectPort %d\n", cp)
	}
	if err := os.WriteFile(p.conf, []byte(b.String()), 0o600); err != nil {
		p.t.Fatal(err)
	}
}

// Reload gives the running proxy new rules (the site opened a port,
// changed the password); open tunnels stay. tinyproxy rereads its config on
// SIGUSR1, asynchronously: callers wait for the effect they expect.
func (p *Proxy) Reload(o ProxyOpts) {
	p.t.Helper()
	p.writeConf(o)
	if err := p.cmd.Process.Signal(syscall.SIGUSR1); err != nil {
		p.t.Fatal(err)
	}
}

// Start restarts a stopped proxy on the same address.
func (p *Proxy) Start() {
	p.t.Helper()
	if err := p.start(); err != nil {
		p.t.Fatal(err)
	}
}

func (p *Proxy) start() error {
	cmd := exec.Command(p.bin, "-d", "-c", p.conf)
	cmd.Stdout, cmd.Stderr = &p.log, &p.log
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("tinyproxy: %w", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", p.Addr, time.Second)
		if err == nil {
			c.Close()
			p.cmd, p.done = cmd, done
			return nil
		}
		select {
		case <-done:
			return fmt.Errorf("tinyproxy exited at start (port taken?): %s", p.log.String())
		default:
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			<-done
			return fmt.Errorf("tinyproxy did not listen on %s within 10 s", p.Addr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop kills the proxy (only the process this test started) and waits.
func (p *Proxy) Stop() {
	if p.cmd == nil {
		return
	}
	_ = p.cmd.Process.Kill()
	<-p.done
	p.cmd = nil
}

// Log is the proxy's log so far (tunnels it opened or refused).
func (p *Proxy) Log() string { return p.log.String() }

func freePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
