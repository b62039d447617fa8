package sdnotify

import (
	"context"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/internal/clock"
)

// The heartbeat holds while the agent keeps its promises (a long planned
// wait included) and fails once it is overdue: then systemd's watchdog is
// no longer fed and restarts a stuck agent.
func TestHeartbeatStopsWhenStuck(t *testing.T) {
	start := time.Unix(1_700_000_000, 0)
	c := clock.NewFake(start)
	n := New(c)
	if ok, _ := n.holds(); !ok {
		t.Fatal("a fresh heartbeat must hold")
	}
	n.Alive(10 * time.Minute) // e.g. DPS asked for a long retry-after
	c.Advance(9 * time.Minute)
	if ok, _ := n.holds(); !ok {
		t.Fatal("a planned wait must count as progress")
	}
	n.Alive(time.Second) // a shorter promise never shortens a longer one
	c.Advance(59 * time.Second)
	if ok, _ := n.holds(); !ok {
		t.Fatal("the longer promise was shortened")
	}
	c.Advance(2 * time.Second)
	ok, since := n.holds()
	if ok {
		t.Fatal("an overdue agent must stop feeding the watchdog")
	}
	if want := start.Add(10 * time.Minute); !since.Equal(want) {
		t.Fatalf("overdue since %v, want %v", since, want)
	}
}

// The watchdog, on the clock it is handed, pings systemd's socket every
// interval (half of WATCHDOG_USEC) while the promises hold, stops once the
// agent is overdue, says so once, and starts again when the agent makes
// progress. The socket is a real unixgram socket, as systemd's is.
func TestWatchdogOnTheClock(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	t.Setenv("WATCHDOG_USEC", "20000000") // pings every 10 s
	t.Setenv("WATCHDOG_PID", "")
	c := clock.NewFake(time.Unix(1_700_000_000, 0))
	n := New(c)
	if n.WatchdogInterval() != 10*time.Second {
		t.Fatalf("watchdog interval %v, want half of WATCHDOG_USEC", n.WatchdogInterval())
	}
	var logs testenv.Buffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); n.Watchdog(ctx, slog.New(slog.NewTextHandler(&logs, nil))) }()
	defer func() { cancel(); <-done }()

	buf := make([]byte, 64)
	next := func() string {
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		k, err := conn.Read(buf)
		if err != nil {
			return err.Error()
		}
		return string(buf[:k])
	}
	quiet := func() bool {
		conn.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		_, err := conn.Read(buf)
		return err != nil
	}
	tick := func() {
		t.Helper()
		bctx, bcancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer bcancel()
		if err := c.BlockUntil(bctx, 1); err != nil {
			t.Fatal("the watchdog armed no ticker")
		}
		c.Advance(10 * time.Second)
	}
	if got := next(); got != "WATCHDOG=1" {
		t.Fatalf("first datagram %q, want WATCHDOG=1 at start", got)
	}
	for i := 0; i < 11; i++ { // 110 s: within the first step's budget (2 min)
		tick()
		if got := next(); got != "WATCHDOG=1" {
			t.Fatalf("tick %d: %q, want WATCHDOG=1 while the promise holds", i, got)
		}
	}
	tick() // 120 s
	next()
	tick() // 130 s: overdue
	if !quiet() {
		t.Fatal("the watchdog was fed although the agent broke its promise")
	}
	tick()
	if !quiet() || strings.Count(logs.String(), "no longer feeding systemd's watchdog") != 1 {
		t.Fatalf("want one error saying the watchdog is no longer fed, and no ping:\n%s", logs.String())
	}
	n.Alive(time.Minute)
	tick()
	if got := next(); got != "WATCHDOG=1" {
		t.Fatalf("after progress: %q, want WATCHDOG=1 again", got)
	}
}
