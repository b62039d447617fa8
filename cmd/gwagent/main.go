// Command gwagent is the device agent for Linux IoT gateways: device keys in
// a TPM, a PKCS#11 token or a file, certificates from Azure IoT Hub DPS,
// telemetry to IoT Hub over MQTT. See README.md.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

// Set by the Makefile with -ldflags -X.
var (
	version   = "dev"
	buildTime = ""
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err == nil || errors.Is(err, context.Canceled) {
		return
	}
	if errors.Is(err, errUsage) {
		os.Exit(2)
	}
	fmt.Fprintln(os.Stderr, "gwagent:", err)
	os.Exit(1)
}
