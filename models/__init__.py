"""Networks: torchvision's ResNets and MobileNetV1, with official-weight loading."""
