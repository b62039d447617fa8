// Package sdnotify speaks systemd's notify protocol for the agent: READY=1,
// STATUS=, STOPPING=1, and the watchdog (WATCHDOG=1), which it feeds only
// while the agent keeps its promises of progress, so that systemd restarts
// an agent that is truly stuck. Without NOTIFY_SOCKET it sends nothing, so
// gwagent runs the same by hand and under systemd.
//
// It is one of the agent's own parts: only agent/ imports it. It reads
// NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID once, at New; it times the
// watchdog and the promises on the clock it is handed (on a device that is
// the system clock, as systemd's watchdog is) and logs only through the
// logger it is handed. A Notifier is safe for concurrent use: the lifecycle
// makes promises while the watchdog goroutine (Watchdog) reads them.
package sdnotify

import (
	"context"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/gwagent/gwagent/internal/clock"
)

// StepBudget is how long any one step of the agent (a connection attempt,
// a key store call, a turn of the main loop) may take before the agent
// counts as stuck.
const StepBudget = 2 * time.Minute

// Notifier sends to systemd's $NOTIFY_SOCKET and keeps the agent's
// heartbeat: its loops declare progress with Alive(d), "I am working and
// will report again within d". Waits declare their length (a DPS
// retry-after of minutes is progress, not a hang); provisioning declares its
// timeout. Watchdog pings only while the last promise holds.
type Notifier struct {
	addr     *net.UnixAddr
	watchdog time.Duration // half of WATCHDOG_USEC, or 0
	clock    clock.Clock

	mu    sync.Mutex
	until time.Time // the last promise
}

// New reads systemd's environment and starts the heartbeat with one step's
// budget.
func New(c clock.Clock) *Notifier {
	n := &Notifier{clock: c, watchdog: watchdogInterval(), until: c.Now().Add(StepBudget)}
	if s := os.Getenv("NOTIFY_SOCKET"); s != "" {
		if s[0] == '@' { // abstract socket
			s = "\x00" + s[1:]
		}
		n.addr = &net.UnixAddr{Name: s, Net: "unixgram"}
	}
	return n
}

func (n *Notifier) send(state string) {
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

// Ready says the agent works (READY=1).
func (n *Notifier) Ready() { n.send("READY=1") }

// Status sets systemd's one-line status (STATUS=).
func (n *Notifier) Status(line string) { n.send("STATUS=" + line) }

// Stopping says the agent is shutting down (STOPPING=1).
func (n *Notifier) Stopping() { n.send("STOPPING=1") }

// WatchdogInterval is how often the watchdog wants a sign of life: half of
// WATCHDOG_USEC when systemd's watchdog is on for this process, else 0.
func (n *Notifier) WatchdogInterval() time.Duration { return n.watchdog }

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

// Alive promises the next sign of life within d. A shorter promise never
// shortens a longer one.
func (n *Notifier) Alive(d time.Duration) {
	t := n.clock.Now().Add(d)
	n.mu.Lock()
	if t.After(n.until) {
		n.until = t
	}
	n.mu.Unlock()
}

// holds reports whether the last promise still holds, and until when it
// did.
func (n *Notifier) holds() (bool, time.Time) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return !n.clock.Now().After(n.until), n.until
}

// Watchdog pings systemd's watchdog every WatchdogInterval while the
// promises hold, until ctx ends; it returns at once if the watchdog is off.
// When a promise is broken it says so once in log and stops pinging.
func (n *Notifier) Watchdog(ctx context.Context, log *slog.Logger) {
	if n.watchdog <= 0 {
		return
	}
	t, tick := n.clock.NewTicker(n.watchdog)
	defer t.Stop()
	n.send("WATCHDOG=1")
	stuck := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick:
		}
		if ok, since := n.holds(); ok {
			stuck = false
			n.send("WATCHDOG=1")
		} else if !stuck {
			stuck = true
			log.Error("the agent made no progress since "+since.Format(time.RFC3339)+"; no longer feeding systemd's watchdog, which will restart it", "stuck_for", n.clock.Now().Sub(since).Round(time.Second))
		}
	}
}
