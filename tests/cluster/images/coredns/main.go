// Command coredns is CoreDNS with only the plugins the test cluster's DNS needs.
//
// The cluster's network is closed: its DNS answers a local zone and asks nobody else.
// Leaving out forward, grpc and the cloud back ends makes that a property of the binary,
// not only of the Corefile, and keeps the build small.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/file"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// plugins lists what this binary registers, in CoreDNS's execution order.
var plugins = []string{"ready", "health", "errors", "log", "hosts", "file"}

func main() {
	dnsserver.Directives = plugins
	coremain.Run()
}
