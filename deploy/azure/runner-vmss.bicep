// Outpost runners as a virtual machine scale set inside an existing subnet.
//
// What it deploys, in the resource group it is deployed to:
// - a user-assigned managed identity: the runners register with the Outpost server with it
//   (Entra ID, no registration token) and get tokens for the private AKS API server with it;
// - a Uniform scale set of Ubuntu 24.04 VMs in `subnetId`, with no public IP, that runs
//   deploy/cloud-init/outpost-runner.yaml as custom data on first boot;
// - in ephemeral mode, a custom role that lets that identity reimage the set's instances, and
//   nothing else, assigned on this scale set only.
//
// What it expects to exist: the virtual network and subnet (peered with, or the same as, the AKS
// cluster's, with a link to its private DNS zone), outbound HTTPS from the subnet to the Outpost
// server and to the download hosts (NAT gateway or firewall), and the runner binary at
// `runnerBinaryUrl`.
// What to do after deploying: allow the identity's principal id (output `identityPrincipalId`)
// on the server for the pool, and give it a Kubernetes role on the cluster (docs/deploy.md).
//
//   az deployment group create -g rg-outpost-runners \
//     --template-file deploy/azure/runner-vmss.bicep \
//     --parameters @deploy/azure/runner-vmss.parameters.json

targetScope = 'resourceGroup'

@description('Name of the scale set; the identity is named after it.')
@minLength(3)
@maxLength(50)
param name string = 'outpost-runners'

@description('Azure region; the subnet must be in it.')
param location string = resourceGroup().location

@description('Resource id of the existing subnet the runners join (it must reach the private AKS API server).')
param subnetId string

@description('The Outpost server\'s public HTTPS URL, e.g. https://outpost.example.com (the runner refuses plain HTTP).')
param serverUrl string

@description('The server-side runner pool these runners belong to; with Entra ID registration the server maps this identity to the pool.')
param pool string

@description('Labels the runners register with; jobs select runners by them (runs_on).')
param labels array

@description('How runners register: entra (the VM\'s managed identity, default) or token (a registration token).')
@allowed([
  'entra'
  'token'
])
param registration string = 'entra'

@description('The registration token, only for registration = token. It travels in custom data; prefer entra.')
@secure()
param registrationToken string = ''

@description('long-lived: each instance runs jobs until stopped. ephemeral: each instance runs one job (run --once) and is then reimaged.')
@allowed([
  'long-lived'
  'ephemeral'
])
param mode string = 'long-lived'

@description('Number of instances (runners).')
@minValue(0)
@maxValue(100)
param instanceCount int = 2

@description('Jobs each long-lived runner runs at once (ephemeral runners run one).')
@minValue(1)
@maxValue(16)
param concurrency int = 1

@description('VM size of the instances.')
param vmSize string = 'Standard_D2s_v5'

@description('Administrator user name (SSH key only, no password).')
param adminUsername string = 'azureuser'

@description('SSH public key of the administrator; reachable only from inside the network (no public IP).')
param sshPublicKey string

@description('HTTPS URL of the static outpost-runner binary (scripts/build-static), e.g. a blob URL.')
param runnerBinaryUrl string

@description('SHA-256 of that binary (SHA256SUMS from scripts/build-static); cloud-init refuses any other file.')
@minLength(64)
@maxLength(64)
param runnerBinarySha256 string

@description('Name jobs use for the cluster (cluster: NAME), or empty to configure no cluster.')
param clusterName string = ''

@description('API server URL of that cluster, e.g. https://aks-prod-1a2b3c4d.privatelink.westeurope.azmk8s.io:443.')
param clusterServer string = ''

@description('CA certificate of that API server, PEM, base64 (certificate-authority-data of its kubeconfig).')
param clusterCaBase64 string = ''

@description('Tags for every resource.')
param tags object = {}

var ephemeral = mode == 'ephemeral'
var allTags = union(tags, {
  'outpost-pool': pool
  'outpost-mode': mode
})

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: '${name}-id'
  location: location
  tags: allTags
}

// The cloud-init file with its @@NAME@@ placeholders filled in, one placeholder per step.
var cloudInit0 = loadTextContent('../cloud-init/outpost-runner.yaml')
var cloudInit1 = replace(cloudInit0, '@@SERVER_URL@@', serverUrl)
var cloudInit2 = replace(cloudInit1, '@@RUNNER_URL@@', runnerBinaryUrl)
var cloudInit3 = replace(cloudInit2, '@@RUNNER_SHA256@@', runnerBinarySha256)
var cloudInit4 = replace(cloudInit3, '@@LABELS@@', join(labels, ','))
var cloudInit5 = replace(cloudInit4, '@@REGISTRATION@@', registration)
var cloudInit6 = replace(cloudInit5, '@@CLIENT_ID@@', identity.properties.clientId)
var cloudInit7 = replace(cloudInit6, '@@REGISTRATION_TOKEN@@', registration == 'token' ? registrationToken : '')
var cloudInit8 = replace(cloudInit7, '@@MODE@@', mode)
var cloudInit9 = replace(cloudInit8, '@@CONCURRENCY@@', string(concurrency))
var cloudInit10 = replace(cloudInit9, '@@CLUSTER_NAME@@', clusterName)
var cloudInit11 = replace(cloudInit10, '@@CLUSTER_SERVER@@', clusterServer)
var cloudInit12 = replace(cloudInit11, '@@CLUSTER_CA_BASE64@@', clusterCaBase64)
var cloudInit = cloudInit12

resource scaleSet 'Microsoft.Compute/virtualMachineScaleSets@2024-07-01' = {
  name: name
  location: location
  tags: allTags
  sku: {
    name: vmSize
    tier: 'Standard'
    capacity: instanceCount
  }
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: {
    orchestrationMode: 'Uniform'
    // Overprovisioned instances would boot, register and be deleted again, leaving offline
    // runners behind.
    overprovision: false
    singlePlacementGroup: false
    // A model change (new binary, new custom data) must not reimage an instance in the middle of
    // a deployment job: instances pick it up when they are reimaged after draining
    // (docs/deploy.md, "Upgrades").
    upgradePolicy: {
      mode: 'Manual'
    }
    virtualMachineProfile: {
      osProfile: {
        // Instances are named <prefix><6 digits>; the runner registers under that host name.
        computerNamePrefix: take(name, 20)
        adminUsername: adminUsername
        customData: base64(cloudInit)
        linuxConfiguration: {
          disablePasswordAuthentication: true
          provisionVMAgent: true
          ssh: {
            publicKeys: [
              {
                path: '/home/${adminUsername}/.ssh/authorized_keys'
                keyData: sshPublicKey
              }
            ]
          }
        }
      }
      storageProfile: {
        imageReference: {
          publisher: 'Canonical'
          offer: 'ubuntu-24_04-lts'
          sku: 'server'
          version: 'latest'
        }
        osDisk: {
          createOption: 'FromImage'
          caching: 'ReadWrite'
          diskSizeGB: 64
          managedDisk: {
            storageAccountType: 'Premium_LRS'
          }
        }
      }
      securityProfile: {
        securityType: 'TrustedLaunch'
        uefiSettings: {
          secureBootEnabled: true
          vTpmEnabled: true
        }
      }
      networkProfile: {
        networkInterfaceConfigurations: [
          {
            name: '${name}-nic'
            properties: {
              primary: true
              ipConfigurations: [
                {
                  // No publicIPAddressConfiguration: the runners are reachable only inside the
                  // network and reach out through the subnet's NAT gateway or firewall.
                  name: 'internal'
                  properties: {
                    primary: true
                    subnet: {
                      id: subnetId
                    }
                  }
                }
              ]
            }
          }
        ]
      }
      diagnosticsProfile: {
        // Managed boot diagnostics: the serial log shows cloud-init's progress.
        bootDiagnostics: {
          enabled: true
        }
      }
    }
  }
}

// Ephemeral mode: the instance reimages itself after its job, with its own identity. A custom
// role with just that action, scoped to this scale set, rather than Virtual Machine Contributor,
// which would also allow run-command on every other instance.
resource recycleRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = if (ephemeral) {
  name: guid(resourceGroup().id, name, 'outpost-runner-recycle')
  properties: {
    roleName: 'Outpost runner recycle (${resourceGroup().name}/${name})'
    description: 'Lets an Outpost runner reimage its own scale set instance after its one job.'
    type: 'CustomRole'
    permissions: [
      {
        actions: [
          'Microsoft.Compute/virtualMachineScaleSets/read'
          'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read'
          'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/reimage/action'
        ]
        notActions: []
      }
    ]
    assignableScopes: [
      resourceGroup().id
    ]
  }
}

resource recycleAssignment 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (ephemeral) {
  name: guid(scaleSet.id, identity.id, 'outpost-runner-recycle')
  scope: scaleSet
  properties: {
    roleDefinitionId: recycleRole.id
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

@description('Object (principal) id of the runners\' identity: allow it on the Outpost server for the pool, and bind it to a Kubernetes role on the cluster.')
output identityPrincipalId string = identity.properties.principalId

@description('Client id of the runners\' identity (what register --entra --client-id and the cluster auth use).')
output identityClientId string = identity.properties.clientId

@description('Resource id of the scale set.')
output scaleSetId string = scaleSet.id

@description('The pool the server should map identityPrincipalId to.')
output runnerPool string = pool
