package agent

import (
	"net"
	"os"
	"strconv"
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
