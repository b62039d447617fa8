// Command memref is make bench's memory reference: a plain paho client
// that publishes one ~100-byte reading a second to the hub and waits for
// each PUBACK, until SIGTERM. The bench samples its anonymous memory
// beside the agent's in the same run, so the agent's figure has a floor
// to be read against. Usage: memref JOB.json (a pahoref.Job).
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/gwagent/gwagent/devtools/bench/pahoref"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "memref:", err)
		os.Exit(1)
	}
}

func run() error {
	if len(os.Args) != 2 {
		return fmt.Errorf("usage: memref JOB.json")
	}
	raw, err := os.ReadFile(os.Args[1])
	if err != nil {
		return err
	}
	var job pahoref.Job
	if err := json.Unmarshal(raw, &job); err != nil {
		return err
	}
	c, err := job.Connect()
	if err != nil {
		return err
	}
	defer c.Disconnect(100)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, os.Interrupt)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	pad := strings.Repeat("x", 70)
	for i := 0; ; i++ {
		select {
		case <-stop:
			return nil
		case <-tick.C:
		}
		tok := c.Publish(job.Topic(i), 1, false, fmt.Appendf(nil, `{"k":%d,"ref":true,"pad":%q}`, i, pad))
		if !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
			return fmt.Errorf("publish: %v", tok.Error())
		}
	}
}
