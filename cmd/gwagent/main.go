// Command gwagent is the device agent for Linux IoT gateways (stub).
package main

import "fmt"

var version = "dev"

func main() { fmt.Println("gwagent", version) }
