package agent

import (
	"context"
	"net"
	"os"
	"strconv"
	"sync"
	"time"
)

// notifier speaks systemd's sd_notify protocol (a datagram to
// $NOTIFY_SOCKET). Without NOTIFY_SOCKET it does nothing, so gwagent runs the
// same by hand and under systemd.
type notifier struct {
	addr *net.UnixAddr
}

func newNotifier() *notifier {
	s := os.Getenv("NOTIFY_SOCKET")
	if s == "" {
		return &notifier{}
	}
	if s[0] == '@' { // abstract socket
		s = "\x00" + s[1:]
	}
	return &notifier{addr: &net.UnixAddr{Name: s, Net: "unixgram"}}
}

func (n *notifier) send(state string) {
	if n.addr == nil {
		return
	}
	c, err := net.DialUnix("unixgram", nil, n.addr)
	if err != nil {
		return
	}
	defer c.Close()
	c.Write([]byte(state))
}

func (n *notifier) ready()          { n.send("READY=1") }
func (n *notifier) status(s string) { n.send("STATUS=" + s) }
func (n *notifier) stopping()       { n.send("STOPPING=1") }
func (n *notifier) watchdog()       { n.send("WATCHDOG=1") }

// watchdogInterval is half of WATCHDOG_USEC when systemd's watchdog is on
// for this process, else 0.
func watchdogInterval() time.Duration {
	usec, err := strconv.ParseInt(os.Getenv("WATCHDOG_USEC"), 10, 64)
	if err != nil || usec <= 0 {
		return 0
	}
	if pid := os.Getenv("WATCHDOG_PID"); pid != "" && pid != strconv.Itoa(os.Getpid()) {
		return 0
	}
	return time.Duration(usec) * time.Microsecond / 2
}

// stepBudget is how long any one step of the agent (a connection attempt,
// a key store call, a turn of the main loop) may take before the agent
// counts as stuck.
const stepBudget = 2 * time.Minute

// heartbeat decides whether systemd's watchdog is fed. The agent's loops
// declare progress with alive(d): "I am working and will report again
// within d". Waits declare their length (a DPS retry-after of minutes is
// progress, not a hang); provisioning declares its timeout. The watchdog
// goroutine pings only while the last promise holds, so an agent that is
// truly stuck stops pinging and systemd restarts it.
type heartbeat struct {
	mu    sync.Mutex
	until time.Time
	now   func() time.Time
}

func newHeartbeat(now func() time.Time) *heartbeat {
	return &heartbeat{now: now, until: now().Add(stepBudget)}
}

// alive promises the next sign of life within d.
func (h *heartbeat) alive(d time.Duration) {
	t := h.now().Add(d)
	h.mu.Lock()
	if t.After(h.until) {
		h.until = t
	}
	h.mu.Unlock()
}

// ok reports whether the last promise still holds, and since when it does
// not.
func (h *heartbeat) ok() (bool, time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return !h.now().After(h.until), h.until
}

// watchdogLoop pings systemd's watchdog every interval while the heartbeat
// holds.
func (a *Agent) watchdogLoop(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	a.notify.watchdog()
	stuck := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if ok, since := a.beat.ok(); ok {
			stuck = false
			a.notify.watchdog()
		} else if !stuck {
			stuck = true
			a.log.Error("the agent made no progress since "+since.Format(time.RFC3339)+"; no longer feeding systemd's watchdog, which will restart it", "stuck_for", a.beat.now().Sub(since).Round(time.Second))
		}
	}
}
