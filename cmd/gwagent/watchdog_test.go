package main

import (
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
)

// notifySocket is a systemd-style NOTIFY_SOCKET: it records every datagram
// with the time it arrived.
type notifySocket struct {
	path string
	mu   sync.Mutex
	msgs []notifyMsg
}

type notifyMsg struct {
	at   time.Time
	text string
}

func listenNotify(t *testing.T) *notifySocket {
	t.Helper()
	n := &notifySocket{path: filepath.Join(t.TempDir(), "notify.sock")}
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 4096)
		for {
			k, err := c.Read(buf)
			if err != nil {
				return
			}
			n.mu.Lock()
			n.msgs = append(n.msgs, notifyMsg{time.Now(), string(buf[:k])})
			n.mu.Unlock()
		}
	}()
	return n
}

func (n *notifySocket) all() []notifyMsg {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]notifyMsg(nil), n.msgs...)
}

// first returns when a message starting with prefix arrived.
func (n *notifySocket) first(prefix string) (time.Time, bool) {
	for _, m := range n.all() {
		if strings.HasPrefix(m.text, prefix) {
			return m.at, true
		}
	}
	return time.Time{}, false
}

// While DPS keeps the agent waiting longer than the watchdog interval, the
// agent keeps feeding systemd's watchdog: real process, real notify socket,
// WATCHDOG_USEC, an azsim assignment delay of three watchdog intervals.
func TestWatchdogFedWhileDPSKeepsUsWaiting(t *testing.T) {
	const watchdog = 3 * time.Second
	az := azsimtest.Start(t, azsim.Config{})
	az.Admin("POST", "/faults/assign-delay", map[string]any{"seconds": 3 * watchdog.Seconds()}, nil)
	d := newCrashDevice(t, az, "gw-watchdog", "")
	ns := listenNotify(t)
	d.start("NOTIFY_SOCKET="+ns.path, "WATCHDOG_USEC=3000000")
	testenv.Eventually(t, 60*time.Second, "connected after the slow assignment", func() bool {
		_, ok := ns.first("STATUS=connected")
		return ok
	})
	ready, ok := ns.first("READY=1")
	if !ok {
		t.Fatal("no READY=1")
	}
	provisioning, _ := ns.first("STATUS=provisioning")
	connected, _ := ns.first("STATUS=connected")
	if connected.Sub(provisioning) < 2*watchdog {
		t.Fatalf("provisioning took %s; the test needs it to outlast the watchdog", connected.Sub(provisioning))
	}
	last := ready
	pings := 0
	for _, m := range ns.all() {
		if m.text != "WATCHDOG=1" || m.at.Before(ready) || m.at.After(connected) {
			continue
		}
		if gap := m.at.Sub(last); gap >= watchdog {
			t.Fatalf("no WATCHDOG=1 for %s (WatchdogSec %s) while the agent waited for DPS: systemd would have killed it\n%s", gap.Round(time.Millisecond), watchdog, d.log())
		}
		last, pings = m.at, pings+1
	}
	if gap := connected.Sub(last); gap >= watchdog {
		t.Fatalf("no WATCHDOG=1 for %s before connecting (%d pings)\n%s", gap.Round(time.Millisecond), pings, d.log())
	}
}
