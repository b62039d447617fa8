// Command azsim is a local emulator of Azure IoT Hub DPS and IoT Hub (stub).
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "azsim: not yet implemented")
	os.Exit(1)
}
