// Command tpmbridge lets TPM clients that speak the Microsoft TPM
// simulator's TCP protocol (TSS.JS, used by Microsoft's Node.js TPM
// security client) use a swtpm on a Unix socket, which takes plain TPM
// commands. make sdkcheck runs it; it is not part of gwagent.
//
//	tpmbridge -swtpm /path/tpm.sock -port 2321   (platform port: 2322)
//
// Command port: HandShake(15) -> version, flags, ack; SendCommand(8) ->
// locality, size, command forwarded to swtpm -> size, response, ack;
// SessionEnd(20)/Stop(21) close. Platform port: every signal (power on,
// NV on, ...) is acknowledged; swtpm runs powered on already.
package main

import (
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"strconv"
	"sync"
)

const (
	sendCommand = 8
	handShake   = 15
	sessionEnd  = 20
	stop        = 21
)

func main() {
	sock := flag.String("swtpm", "", "swtpm Unix socket (swtpm socket --server type=unixio,path=...)")
	port := flag.Int("port", 2321, "command port; the platform port is port+1")
	flag.Parse()
	if *sock == "" {
		log.Fatal("tpmbridge: -swtpm is required")
	}
	var mu sync.Mutex // swtpm serves one command at a time
	cmdLn, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(*port))
	if err != nil {
		log.Fatal(err)
	}
	platLn, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(*port+1))
	if err != nil {
		log.Fatal(err)
	}
	go serve(platLn, func(c net.Conn) error {
		for {
			var sig uint32
			if err := binary.Read(c, binary.BigEndian, &sig); err != nil {
				return err
			}
			if err := binary.Write(c, binary.BigEndian, uint32(0)); err != nil {
				return err
			}
		}
	})
	serve(cmdLn, func(c net.Conn) error {
		tpm, err := net.Dial("unix", *sock)
		if err != nil {
			return err
		}
		defer tpm.Close()
		for {
			var op uint32
			if err := binary.Read(c, binary.BigEndian, &op); err != nil {
				return err
			}
			switch op {
			case handShake:
				var ver uint32
				if err := binary.Read(c, binary.BigEndian, &ver); err != nil {
					return err
				}
				if err := binary.Write(c, binary.BigEndian, []uint32{1, 1 /* platform available */, 0}); err != nil {
					return err
				}
			case sendCommand:
				var hdr [5]byte // locality, size
				if _, err := io.ReadFull(c, hdr[:]); err != nil {
					return err
				}
				n := binary.BigEndian.Uint32(hdr[1:])
				if n > 1<<16 {
					return fmt.Errorf("command of %d bytes", n)
				}
				cmd := make([]byte, n)
				if _, err := io.ReadFull(c, cmd); err != nil {
					return err
				}
				mu.Lock()
				rsp, err := exchange(tpm, cmd)
				mu.Unlock()
				if err != nil {
					return err
				}
				out := binary.BigEndian.AppendUint32(nil, uint32(len(rsp)))
				out = append(out, rsp...)
				out = binary.BigEndian.AppendUint32(out, 0)
				if _, err := c.Write(out); err != nil {
					return err
				}
			case sessionEnd, stop:
				return nil
			default:
				return fmt.Errorf("unsupported simulator command %d", op)
			}
		}
	})
}

// exchange sends one command to swtpm and reads one response (its size is
// in the header).
func exchange(tpm net.Conn, cmd []byte) ([]byte, error) {
	if _, err := tpm.Write(cmd); err != nil {
		return nil, err
	}
	hdr := make([]byte, 10)
	if _, err := io.ReadFull(tpm, hdr); err != nil {
		return nil, err
	}
	size := binary.BigEndian.Uint32(hdr[2:6])
	if size < 10 || size > 1<<16 {
		return nil, errors.New("bad response size from swtpm")
	}
	rest := make([]byte, size-10)
	if _, err := io.ReadFull(tpm, rest); err != nil {
		return nil, err
	}
	return append(hdr, rest...), nil
}

func serve(ln net.Listener, handle func(net.Conn) error) {
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go func() {
			defer c.Close()
			if err := handle(c); err != nil && !errors.Is(err, io.EOF) {
				log.Printf("tpmbridge: %v", err)
			}
		}()
	}
}
